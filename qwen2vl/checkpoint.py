"""Checkpoint I/O: key layouts, safetensors loading into meta-built models, sharded saving (where the files are:
`model_files`).

Key layouts (REFERENCE §4.4):
* hub / legacy (what official repos and transformers' ``save_pretrained`` contain):
  ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``, ``visual.*``, ``lm_head.weight`` (absent when tied)
* module / new (our parameter names): ``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``
* bare ``Qwen2VLModel`` (module names): ``language_model.*``, ``visual.*``
All three load into both model kinds; ``save_checkpoint`` always writes the legacy hub layout.
The patch embedding is a 2-D Linear ``(E, C*T*p*p)`` in the model and a 5-D Conv3d ``(E, C, T, p, p)`` on disk.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .model_files import (SHARD_RE, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, checkpoint_files,  # noqa: F401 (re-exported)
                          resolve_model_dir)
from .own_memory import to_own_memory

PATCH_EMBED_SUFFIX = "patch_embed.proj.weight"  # also the bare vision model's name
_PROGRESS_MIN_BYTES = 256 * 2 ** 20


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


# ----------------------------------------------------------------------------------------------- key mapping
def model_kind(model: nn.Module) -> str:
    """``"causal_lm"`` when parameter names start with ``model.`` (ForConditionalGeneration), else ``"base"``."""
    for name, _ in model.named_parameters(remove_duplicate=False):
        return "causal_lm" if name.startswith("model.") or name.startswith("lm_head.") else "base"
    return "causal_lm" if hasattr(model, "lm_head") or hasattr(model, "model") else "base"


def _check_kind(kind: str) -> None:
    if kind not in ("causal_lm", "base"):
        raise ValueError(f"model_kind must be 'causal_lm' or 'base', got {kind!r}")


def checkpoint_to_model_key(key: str, model_kind: str = "causal_lm") -> str:
    """Map a checkpoint key (legacy, new or bare-base layout) to the model's parameter name."""
    _check_kind(model_kind)
    if key.startswith(("model.language_model.", "model.visual.")):
        full = key
    elif key.startswith(("language_model.", "visual.")):
        full = "model." + key
    elif key.startswith("model."):
        full = "model.language_model." + key[len("model."):]
    else:
        full = key  # lm_head.* and anything unknown (reported as unexpected if it matches nothing)
    if model_kind == "base" and full.startswith("model."):
        return full[len("model."):]
    return full


def model_to_checkpoint_key(key: str, model_kind: str = "causal_lm") -> str:
    """Map a model parameter name to the legacy hub layout (``model.layers.*``, ``visual.*``)."""
    _check_kind(model_kind)
    if model_kind == "base" and key.startswith(("language_model.", "visual.")):
        key = "model." + key
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


# ----------------------------------------------------------------------------------------------- model helpers
def _named_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor, bool]]:
    """name -> (owner module, attribute, tensor, is_parameter) for parameters and persistent buffers."""
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                out[prefix + attr] = (mod, attr, p, True)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                out[prefix + attr] = (mod, attr, b, False)
    return out


def _find_tied_pair(names: Iterable[str]) -> tuple[str, str] | None:
    names = list(names)
    head = next((n for n in names if n == "lm_head.weight"), None)
    emb = next((n for n in names if n.endswith("embed_tokens.weight")), None)
    return (head, emb) if head and emb else None


def _is_tied(model: nn.Module, tensors: dict) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", None) is not None:
        return bool(cfg.tie_word_embeddings)
    pair = _find_tied_pair(tensors)
    return bool(pair) and tensors[pair[0]][2] is tensors[pair[1]][2]


def _patch_embed_5d_shape(model: nn.Module, weight_shape: torch.Size) -> tuple[int, ...]:
    e, n = weight_shape
    vcfg = None
    cfg = getattr(model, "config", None)
    if cfg is not None:
        vcfg = getattr(cfg, "vision_config", None)
    if vcfg is None:
        for mod in model.modules():
            c = getattr(mod, "config", None)
            if c is not None and hasattr(c, "temporal_patch_size") and hasattr(c, "patch_size"):
                vcfg = c
                break
    if vcfg is not None:
        c, t, p = vcfg.in_channels, vcfg.temporal_patch_size, vcfg.patch_size
    else:  # no config anywhere: assume RGB, 2 frames, square patches
        c, t = 3, 2
        p = round((n / (c * t)) ** 0.5)
    if c * t * p * p != n:
        raise ValueError(f"patch embedding weight {tuple(weight_shape)} does not match in_channels={c}, "
                         f"temporal_patch_size={t}, patch_size={p} (expected {c * t * p * p} inputs)")
    return (e, c, t, p, p)


def _adapt_shape(name: str, expected: torch.Size, got: tuple[int, ...]) -> bool:
    """True when a checkpoint tensor of shape ``got`` can fill ``expected`` (exact, or 5-D conv → 2-D linear)."""
    got = tuple(got)
    if got == tuple(expected):
        return True
    if name.endswith(PATCH_EMBED_SUFFIX) and len(expected) == 2 and len(got) == 5 and got[0] == expected[0]:
        return got[1] * got[2] * got[3] * got[4] == expected[1]
    return False


def _resolve_dtype(dtype) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, dtype.replace("torch.", ""))
    raise ValueError(f"dtype must be a torch.dtype, a dtype name like 'bfloat16', 'auto' or None; got {dtype!r}")


# ----------------------------------------------------------------------------------------------- loading
def load_checkpoint_into(model: nn.Module, model_dir: str | os.PathLike, dtype=None, device="cpu",
                         strict: bool = True, progress: bool = True, optional: tuple[str, ...] = ()) -> LoadResult:
    """Load safetensors weights from ``model_dir`` straight into ``model`` (typically built on ``meta``).

    Each tensor is read on its own with ``safe_open``, converted to ``dtype`` (floating tensors only; ``None``:
    the dtype the parameter was built with; ``"auto"``: the stored dtype) on ``device`` and installed as the
    module's parameter — no random init and no second copy of the model. Missing / unexpected / wrongly shaped
    tensors raise one ValueError listing them all (missing and unexpected only when ``strict``). Afterwards
    ``lm_head`` is tied to the embedding when the config says so, and every module's ``_init_buffers(device)``
    hook is called to re-create non-persistent buffers. Names in ``optional`` may be missing even when
    ``strict`` (they are initialized like strict=False ones).
    """
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    kind = model_kind(model)
    files = checkpoint_files(model_dir)
    tensors = _named_tensors(model)
    tied = _is_tied(model, tensors)
    pair = _find_tied_pair(tensors)
    # group names that share one tensor object so every alias gets the loaded tensor
    aliases: dict[int, list[str]] = {}
    for n, (_, _, t, _) in tensors.items():
        aliases.setdefault(id(t), []).append(n)
    expected = dict(tensors)
    if tied and pair:
        expected.pop(pair[0], None)

    # pass 1: headers only — names and shapes, no tensor data read
    plan: list[tuple[Path, str, str]] = []       # (file, checkpoint key, model key)
    unexpected, bad_shapes, seen = [], [], set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                mkey = checkpoint_to_model_key(key, kind)
                if mkey not in expected:
                    if (tied and pair and mkey == pair[0]) or (kind == "base" and mkey.startswith("lm_head.")):
                        continue  # tied head / base model: the checkpoint's lm_head is not used
                    unexpected.append(key)
                    continue
                sl = sf.get_slice(key)
                shape = tuple(sl.get_shape())
                want = expected[mkey][2].shape
                if not _adapt_shape(mkey, want, shape):
                    bad_shapes.append(f"{key}: expected {tuple(want)}, got {shape}")
                    seen.add(mkey)   # present, reported as a shape error rather than as missing
                    continue
                seen.add(mkey)
                plan.append((f, key, mkey))
    for n in list(seen):  # a module registered twice (a tied LM head that is a quantized embedding's table):
        seen.update(aliases[id(expected[n][2])])  # its other names get the tensor read under the first
    missing = sorted(set(expected) - seen)
    if bad_shapes or (strict and (set(missing) - set(optional) or unexpected)):
        parts = []
        if missing and strict:
            parts.append(f"missing {len(missing)} tensor(s): {missing}")
        if unexpected and strict:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {sorted(unexpected)}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} tensor(s) with the wrong shape: {bad_shapes}")
        raise ValueError(f"checkpoint in {model_dir} does not match the model ({kind}): " + "; ".join(parts))

    # pass 2: read one tensor at a time, convert, install
    bar = None
    if progress and sum(f.stat().st_size for f in files) >= _PROGRESS_MIN_BYTES:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), desc="Loading weights", unit="tensor")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    read_device = "cpu" if device.type not in ("cuda", "cpu") else str(device)   # e.g. mps: read, then move
    try:
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for f, key, mkey in plan:
            by_file.setdefault(f, []).append((key, mkey))
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt", device=read_device) as sf:
                for key, mkey in items:
                    _install(tensors, aliases, mkey, sf.get_tensor(key), dtype, device)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if missing:  # strict=False: materialize what the checkpoint lacks, with the module's own init
        _materialize_missing(model, tensors, missing, dtype, device)
    if tied and pair:
        tie_embeddings(model)
    _init_buffers(model, device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"after loading, tensors are still on the meta device: {still_meta[:20]}; non-persistent "
                         "buffers must be re-created by a module method `_init_buffers(device)`")
    return LoadResult(missing, sorted(unexpected))


def _install(tensors, aliases, mkey, t: torch.Tensor, dtype, device) -> None:
    _, _, old, is_param = tensors[mkey]
    if t.dim() == 5 and old.dim() == 2:
        t = t.reshape(old.shape)
    owner, attr = tensors[mkey][0], tensors[mkey][1]
    if t.is_floating_point() and old.is_floating_point() and attr not in getattr(owner, "keep_dtype", ()):
        target = old.dtype if dtype is None else (t.dtype if dtype == "auto" else dtype)
    else:
        target = old.dtype
    src = t
    t = t.to(device=device, dtype=target)
    if t.device.type == "cpu" and t.data_ptr() == src.data_ptr():
        t = to_own_memory(t)  # still the mapped file's memory: decoding reads it faster as our own (own_memory.py)
    if is_param:
        t = nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point())
    for name in aliases[id(old)]:   # names sharing one tensor get the very same new one
        mod, attr, _, _ = tensors[name]
        if is_param:
            mod._parameters[attr] = t
        else:
            mod._buffers[attr] = t


def _materialize_missing(model, tensors, missing, dtype, device) -> None:
    """Allocate tensors the checkpoint lacked and initialize them with the model's own init (strict=False)."""
    by_mod: dict[int, tuple[nn.Module, set[str]]] = {}
    for name in missing:
        mod, attr, _, _ = tensors[name]
        by_mod.setdefault(id(mod), (mod, set()))[1].add(attr)
    init = getattr(model, "_init_weights", None)
    for mod, attrs in by_mod.values():
        loaded = {a: p for a, p in mod._parameters.items() if p is not None and a not in attrs}
        for attr, p in list(mod._parameters.items()):   # loaded ones get scratch stand-ins during init
            if p is None:
                continue
            target = p.dtype if attr in loaded or dtype in (None, "auto") or not p.is_floating_point() else dtype
            mod._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=target, device=device),
                                                 requires_grad=p.requires_grad)
        with torch.no_grad():
            if callable(init):
                init(mod)
            elif hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        mod._parameters.update(loaded)


def tie_embeddings(model: nn.Module) -> None:
    """Make ``lm_head.weight`` the same Parameter as the input embedding (``model.tie_weights()`` if defined)."""
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
        return
    tensors = _named_tensors(model)
    pair = _find_tied_pair(tensors)
    if pair is None:
        return
    head_mod, head_attr, _, _ = tensors[pair[0]]
    head_mod._parameters[head_attr] = tensors[pair[1]][2]


def _init_buffers(model: nn.Module, device: torch.device) -> None:
    for mod in model.modules():
        hook = getattr(type(mod), "_init_buffers", None)
        if callable(hook):
            mod._init_buffers(device)


# ----------------------------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """``5GB`` → 5·10⁹ bytes, ``5GiB`` → 5·2³⁰, ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be an int or a string like '5GB' / '500MB', got {size!r}")
    base = 1024 if m.group(3) == "IB" else 1000
    value = int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hub-layout name → tensor (model's own storage; 5-D patch embedding view; lm_head omitted when tied)."""
    kind = model_kind(model)
    tensors = _named_tensors(model)
    pair = _find_tied_pair(tensors)
    skip = {pair[0]} if pair and _is_tied(model, tensors) else set()
    out, seen = {}, {}
    for name, (_, _, t, _) in tensors.items():
        if name in skip:
            continue
        if t.is_meta:
            raise ValueError(f"cannot save {name}: it is on the meta device (load or initialize the model first)")
        if id(t) in seen:   # the same tensor under two names: save it once
            continue
        seen[id(t)] = name
        key = model_to_checkpoint_key(name, kind)
        if name.endswith(PATCH_EMBED_SUFFIX) and t.dim() == 2:
            t = t.reshape(_patch_embed_5d_shape(model, t.shape))
        out[key] = t.detach()
    return out


def save_checkpoint(model: nn.Module, save_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                    safe_serialization: bool = True) -> list[Path]:
    """Write the model's weights in the hub layout; shards above ``max_shard_size`` with an index file.

    Returns the written weight files. Stale ``model*.safetensors`` / index files in ``save_dir`` are removed.
    """
    if not safe_serialization:
        raise ValueError("only safetensors serialization is supported (safe_serialization=True)")
    limit = parse_size(max_shard_size)
    out_dir = Path(save_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"save_dir {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state_dict(model)
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    for f in out_dir.iterdir():
        if f.name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or SHARD_RE.match(f.name):
            f.unlink()
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, written, total = {}, [], 0
    for fname, keys in zip(names, shards):
        part = {k: state[k].to("cpu").contiguous() for k in keys}   # one shard in CPU memory at a time
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: fname for k in keys})
        written.append(out_dir / fname)
        del part
    if n > 1:
        index = {"metadata": {"total_size": total,
                              "total_parameters": sum(t.numel() for t in state.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return written


__all__ = ["resolve_model_dir", "checkpoint_files", "model_kind", "checkpoint_to_model_key",
           "model_to_checkpoint_key", "load_checkpoint_into", "save_checkpoint", "checkpoint_state_dict",
           "tie_embeddings", "parse_size", "LoadResult", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME"]
