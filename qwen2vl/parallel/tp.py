"""Tensor parallelism for Qwen2-VL on `torch.distributed` (gloo on CPU, NCCL on CUDA).

Plan ("auto", as the reference tp plan), N = tensor-parallel size, rank r:
* text decoder: q/k/v_proj column-wise by whole heads (rank r: heads [r*H/N, (r+1)*H/N), kv heads likewise,
  biases too); gate/up_proj column-wise; o_proj / down_proj row-wise + all-reduce of the output;
* embed_tokens vocab-parallel (rows padded to a multiple of N, output all-reduced), lm_head vocab-parallel with
  all-gathered logits: every rank gets the full, bitwise identical logits, so greedy and seeded sampling agree
  on all ranks (the torch RNG state of rank 0 is copied to every rank at load time; re-seed identically on all
  ranks afterwards); a tied lm_head shares the embedding shard;
* norms and the whole vision tower replicated.
Each rank reads only its shards from the safetensors files (`safe_open(...).get_slice(name)[rows]`), so no rank
ever holds the full text weights. Attention modules get the local `num_heads` / `num_kv_heads` and the model
`tp_world_size = N`; the engine derives its caches' kv-head count from that (`engine.kv_pool.local_kv_heads`) and
passes it explicitly, and the caches model/ and generation/ build come from `model.new_cache`, which counts the
attention modules' local kv heads. The config is never changed to say so.

Entry points: `from_pretrained(..., tp_plan="auto", tp_size=N)` under torchrun (→ `load_tensor_parallel`),
`parallelize(model)` for a model already in memory (every rank holds the same full model; tests / tools), and
`qwen2vl.parallel.spawn.launch` / `start_tensor_parallel` (spawning ranks; rank-0 driver + worker loop in `tp_runner`).
"""
from __future__ import annotations

import atexit
import copy
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open

from ..checkpoint import checkpoint_files, checkpoint_to_model_key
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
                     shard_size)

_CONTROL_TIMEOUT = timedelta(days=365)   # the worker loop may wait for the next request for a long time


@dataclass
class TPContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: object                 # data-plane group (the default group)
    control_group: object         # gloo group for pickled commands / RNG state (CPU)


_CTX: TPContext | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already broken (a peer died): nothing left to release cleanly
            pass


def init_distributed(tp_size: int | None = None, backend: str | None = None) -> TPContext:
    """Join (or create) the default process group from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Backend: the existing group's, else `backend`, else $QWEN2VL_TP_BACKEND, else
    NCCL when CUDA is available
    (device cuda:LOCAL_RANK) and gloo otherwise (CPU). `tp_size=1` without any env runs a 1-rank group."""
    global _CTX
    if _CTX is not None and dist.is_initialized():
        if tp_size is not None and tp_size != _CTX.world_size:
            raise ValueError(f"tp_size={tp_size} but the process group has world size {_CTX.world_size}")
        return _CTX
    if not dist.is_initialized():
        single = "WORLD_SIZE" not in os.environ or "RANK" not in os.environ
        if single and tp_size not in (None, 1):
            raise ValueError(
                f"tp_size={tp_size} needs {tp_size} processes: run under `torchrun --nproc-per-node {tp_size}` "
                "(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set) or spawn them with qwen2vl.parallel.spawn.launch.")
        world = 1 if single else int(os.environ["WORLD_SIZE"])
        if tp_size is not None and tp_size != world:
            raise ValueError(f"tp_size={tp_size} but WORLD_SIZE={world}: tensor parallelism uses every rank "
                             "(launch exactly tp_size processes)")
        backend = backend or os.environ.get("QWEN2VL_TP_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if single:   # a 1-rank group of our own; the environment is left alone
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                    world_size=1)
        else:
            dist.init_process_group(backend=backend, init_method="env://")
        # A group we created is torn down explicitly at exit: leaving gloo's threads to the interpreter's
        # teardown can abort the process ("terminate called without an active exception").
        atexit.register(_destroy_group)
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size is not None and tp_size != world:
        raise ValueError(f"tp_size={tp_size} but the process group has world size {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT) if world > 1 else None
    _CTX = TPContext(rank, world, local_rank, device, dist.group.WORLD, control)
    return _CTX


def get_context() -> TPContext | None:
    return _CTX if dist.is_initialized() else None


def sync_rng_state(ctx: TPContext) -> None:
    """Copy rank 0's torch RNG state (CPU, and the current CUDA device's) to every rank so sampling agrees."""
    if ctx.world_size == 1:
        return
    state = torch.get_rng_state()
    dist.broadcast(state, 0, group=ctx.control_group)
    torch.set_rng_state(state)
    if ctx.device.type == "cuda":
        cstate = torch.cuda.get_rng_state(ctx.device)
        dist.broadcast(cstate, 0, group=ctx.control_group)
        torch.cuda.set_rng_state(cstate, ctx.device)


# ----------------------------------------------------------------------------------------------- plan
def check_tp_sizes(text_config, tp_size: int) -> None:
    """ValueError naming every size that does not split evenly over `tp_size` ranks (vocab is padded)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    bad = [f"{name}={getattr(text_config, name)}" for name in
           ("num_attention_heads", "num_key_value_heads", "intermediate_size")
           if getattr(text_config, name) % tp_size]
    if bad:
        raise ValueError(f"tensor parallelism with tp_size={tp_size} needs these sizes to be divisible by "
                         f"{tp_size}: {', '.join(bad)}")


_LAYER = r"(?:^|\.)language_model\.layers\.\d+\."
_RULES = [  # (pattern on the model parameter name, how it is sharded)
    (re.compile(_LAYER + r"self_attn\.[qkv]_proj\.(weight|bias)$"), "col"),
    (re.compile(_LAYER + r"mlp\.(gate|up)_proj\.weight$"), "col"),
    (re.compile(_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.weight$"), "row"),
    (re.compile(r"(?:^|\.)language_model\.embed_tokens\.weight$"), "vocab"),
    (re.compile(r"^lm_head\.weight$"), "vocab"),
]


def shard_rule(name: str) -> str:
    """'col' | 'row' | 'vocab' | 'replicate' for a model parameter name."""
    for pattern, rule in _RULES:
        if pattern.search(name):
            return rule
    return "replicate"


def read_shard(source, shape: tuple[int, ...], rule: str, rank: int, tp_size: int) -> torch.Tensor:
    """Read this rank's part of a tensor. `source` is anything sliceable like a tensor (a safetensors
    `get_slice` handle or a torch.Tensor); only the selected rows/columns are read."""
    if rule == "replicate" or (tp_size == 1 and rule != "vocab"):
        return source[:]
    if rule == "col":
        n = shape[0] // tp_size
        return source[rank * n:(rank + 1) * n]
    if rule == "row":
        n = shape[1] // tp_size
        return source[:, rank * n:(rank + 1) * n]
    # vocab rows, padded with zeros up to ceil(V/N) per rank
    vocab = shape[0]
    n = shard_size(vocab, tp_size, pad=True)
    start, stop = min(rank * n, vocab), min((rank + 1) * n, vocab)
    part = source[start:stop] if stop > start else None
    if part is not None and part.shape[0] == n:
        return part
    out = torch.zeros((n, *shape[1:]), dtype=part.dtype if part is not None else torch.float32)
    if part is not None:
        out[: part.shape[0]] = part
    return out


def parallelize_modules(model: nn.Module, ctx: TPContext) -> None:
    """Swap the text decoder's linears / embedding / lm_head for their parallel versions (built on the device
    the originals live on, typically meta) and set the attention modules' local head counts."""
    text = model.language_model
    cfg = text.config
    n, r, g = ctx.world_size, ctx.rank, ctx.group
    check_tp_sizes(cfg, n)
    h, d = cfg.hidden_size, cfg.head_dim
    dev = text.embed_tokens.weight.device
    kw = dict(tp_rank=r, tp_size=n, group=g, device=dev)
    for layer in text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear(h, cfg.num_attention_heads * d, True, **kw)
        attn.k_proj = ColumnParallelLinear(h, cfg.num_key_value_heads * d, True, **kw)
        attn.v_proj = ColumnParallelLinear(h, cfg.num_key_value_heads * d, True, **kw)
        attn.o_proj = RowParallelLinear(cfg.num_attention_heads * d, h, False, **kw)
        attn.num_heads = cfg.num_attention_heads // n
        attn.num_kv_heads = cfg.num_key_value_heads // n
        mlp.gate_proj = ColumnParallelLinear(h, cfg.intermediate_size, False, **kw)
        mlp.up_proj = ColumnParallelLinear(h, cfg.intermediate_size, False, **kw)
        mlp.down_proj = RowParallelLinear(cfg.intermediate_size, h, False, **kw)
    text.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, h, **kw)
    if getattr(model, "lm_head", None) is not None:
        model.lm_head = VocabParallelLMHead(h, cfg.vocab_size, **kw)
    model.tp_rank, model.tp_world_size = r, n


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                out[prefix + attr] = (mod, attr, p)
    return out


def _install(owners, name: str, t: torch.Tensor, dtype, device) -> None:
    mod, attr, old = owners[name]
    if t.dim() == 5 and old.dim() == 2:            # Conv3d patch embedding on disk → Linear
        t = t.reshape(old.shape)
    if tuple(t.shape) != tuple(old.shape):
        raise ValueError(f"tensor-parallel shard of {name} has shape {tuple(t.shape)}, expected {tuple(old.shape)}")
    target = (dtype or old.dtype) if t.is_floating_point() else old.dtype
    mod._parameters[attr] = nn.Parameter(t.to(device=device, dtype=target), requires_grad=False)


def _finish(model: nn.Module, ctx: TPContext, config) -> nn.Module:
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"tensor-parallel load left parameters unset: {still_meta[:20]}")
    model.eval()
    model.tp_context = ctx
    sync_rng_state(ctx)
    return model


def load_tensor_parallel(cls, config, model_dir, torch_dtype=None, tp_plan="auto", tp_size=None, progress=True,
                         backend: str | None = None):
    """Build `cls` (Qwen2VLForConditionalGeneration or Qwen2VLModel) sharded over the ranks of the process
    group, each rank reading only its shards from `model_dir`'s safetensors. Call on every rank."""
    if tp_plan not in ("auto", None):
        raise ValueError(f"tp_plan={tp_plan!r} is not supported; use tp_plan='auto'")
    config = copy.deepcopy(config)
    if tp_size is not None:
        check_tp_sizes(config.text_config, tp_size)   # before any process is joined
    ctx = init_distributed(tp_size, backend)
    check_tp_sizes(config.text_config, ctx.world_size)
    with torch.device("meta"):
        model = cls(config)
    if not hasattr(model, "language_model"):
        raise ValueError(f"tensor parallelism supports Qwen2VLForConditionalGeneration / Qwen2VLModel, "
                         f"not {cls.__name__}")
    kind = "causal_lm" if hasattr(model, "lm_head") else "base"
    parallelize_modules(model, ctx)
    owners = _owners(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = {n for n in owners if not (tied and n == "lm_head.weight")}
    files = checkpoint_files(model_dir)
    bar = None
    if progress and ctx.rank == 0 and sum(f.stat().st_size for f in files) >= 256 * 2 ** 20:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(expected), desc=f"Loading tensor-parallel shards (tp={ctx.world_size})",
                   unit="tensor")
    seen, unexpected = set(), []
    try:
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    name = checkpoint_to_model_key(key, kind)
                    if name not in expected:
                        if not (name == "lm_head.weight" and (tied or kind == "base")):
                            unexpected.append(key)
                        continue
                    sl = sf.get_slice(key)
                    shape = tuple(sl.get_shape())
                    t = read_shard(sl, shape, shard_rule(name), ctx.rank, ctx.world_size)
                    _install(owners, name, t, torch_dtype, ctx.device)
                    seen.add(name)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise ValueError(f"checkpoint in {model_dir} does not match the model: missing {missing[:20]}, "
                         f"unexpected {sorted(unexpected)[:20]}")
    model = _finish(model, ctx, config)
    model.name_or_path = str(model_dir)
    return model


def parallelize(model: nn.Module, tp_size: int | None = None, backend: str | None = None) -> nn.Module:
    """Shard an in-memory model (identical on every rank, e.g. same seed) in place and return it.
    Meant for tests and tools; real checkpoints should use `load_tensor_parallel` (no full copy per rank)."""
    check_tp_sizes(model.config.text_config, tp_size or 1)
    ctx = init_distributed(tp_size, backend)
    full = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    model.config = copy.deepcopy(model.config)
    if hasattr(model, "model"):
        model.model.config = model.config
        model.model.language_model.config = model.config.text_config
    elif hasattr(model, "language_model"):
        model.language_model.config = model.config.text_config
    parallelize_modules(model, ctx)
    owners = _owners(model)
    tied = bool(model.config.tie_word_embeddings)
    for name in owners:
        if tied and name == "lm_head.weight":
            continue
        src = full[name]
        t = read_shard(src, tuple(src.shape), shard_rule(name), ctx.rank, ctx.world_size)
        _install(owners, name, t.clone(), src.dtype, ctx.device)
    return _finish(model, ctx, model.config)


def text_parameter_count(model: nn.Module) -> int:
    """Unique text-decoder parameters (embedding + decoder + untied lm_head) held by this rank."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "visual." in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
