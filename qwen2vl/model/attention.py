"""Attention backends: "sdpa" (default), "eager", "flash_attention_2".

Text attention takes q (B,Hq,S,D), k/v (B,Hkv,K,D) and a boolean mask (B,1,S,K) (True = attend) or None
meaning plain causal over the last S of K keys. Vision attention is block-diagonal over `cu_seqlens`
segments: equal-length segments are stacked into one batched call (no dense N x N mask, no loop per image).
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..kernels import choose
from ..kernels.backend import KernelOps, TorchOps
from ..kernels.backend import current as current_ops
from ..kernels.build import has_native_bf16_matmul


BACKENDS = ("sdpa", "eager", "flash_attention_2")


def check_backend(name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error for an unknown backend or for flash-attention where it cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation must be one of {BACKENDS}, got {name!r}")
    if name != "flash_attention_2":
        return
    if _flash_varlen() is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install "
                         "flash-attn) or a PyTorch with torch.nn.attention.varlen (>= 2.9); use 'sdpa' otherwise.")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"attn_implementation='flash_attention_2' runs on CUDA devices only, got {device}; "
                         "use 'sdpa' on CPU.")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_implementation='flash_attention_2' needs float16 or bfloat16, got {dtype}.")


def _flash_varlen():
    """The FlashAttention-2 varlen function to use, or None: flash-attn's `flash_attn_varlen_func` when that
    package is installed, else PyTorch's own `torch.nn.attention.varlen.varlen_attn` (>= 2.9), which runs the
    same FlashAttention-2 kernels shipped inside PyTorch's CUDA build."""
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return _torch_varlen_adapter(varlen_attn)


def _torch_varlen_adapter(varlen_attn):
    """flash-attn's calling convention on top of torch's varlen_attn, whose keyword arguments changed between
    releases: 2.9/2.10 take `is_causal` (and no scale), later ones `window_size=(-1, 0)` for causal and `scale`;
    `enable_gqa` arrived later still (before it, K/V heads are repeated here)."""
    import inspect

    params = inspect.signature(varlen_attn).parameters

    def run(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        kw = {}
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if "scale" in params:
            kw["scale"] = softmax_scale
        elif softmax_scale is not None:
            q = q * (softmax_scale * q.shape[-1] ** 0.5)  # the default scale is 1/sqrt(D)
        if "window_size" in params:
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kw["is_causal"] = causal
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    return run


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def attention_probs(q, k, mask, scale, causal_if_no_mask=True):
    """q (B,Hq,S,D), k (B,Hkv,K,D) → softmax probabilities (B,Hq,S,K) in q's dtype (what eager attention
    multiplies V by, and what output_attentions returns)."""
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None and causal_if_no_mask and q.shape[2] > 1:
        s, kl = q.shape[2], k.shape[2]
        mask = torch.ones(s, kl, dtype=torch.bool, device=q.device).tril(kl - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def eager_attention(q, k, v, mask, scale, causal_if_no_mask=True):
    probs = attention_probs(q, k, mask, scale, causal_if_no_mask)
    return torch.matmul(probs, _repeat_kv(v, q.shape[1] // v.shape[1]))


def sdpa_attention(q, k, v, mask, scale, causal_if_no_mask=True, ops: TorchOps | None = None):
    """SDPA semantics; on CPU the op layer's decode / prefill kernels where `choose` keeps them (ops: the model's
    op layer, default this process's)."""
    s = q.shape[2]
    ops = current_ops() if ops is None else ops
    if s == 1 and q.device.type == "cpu" and causal_if_no_mask \
            and text_attention_choice("decode_attention", q, k) != "torch":
        # Decoding on CPU: torch's SDPA has a large fixed cost per (row, head); the kernel reads each KV head once.
        o = ops.decode_attention(q, k, v, mask, scale)
        if o is not None:
            return o
    if s >= 64 and mask is None and causal_if_no_mask and q.device.type == "cpu" \
            and text_attention_choice("prefill_attention", q, k) != "torch":
        # Prefill on CPU (rows alike): bf16 flash kernel, several times faster than CPU SDPA without AMX.
        o = ops.prefill_attention(q, k, v, scale)
        if o is not None:
            return o
    return torch_sdpa(q, k, v, mask, scale, causal_if_no_mask)


def torch_sdpa(q, k, v, mask, scale, causal_if_no_mask=True):
    """torch's SDPA for q (B,Hq,S,D), k/v (B,Hkv,K,D), mask (B,1,S,K) bool or None (causal over the last S keys
    when causal_if_no_mask, else none)."""
    n_rep = q.shape[1] // k.shape[1]
    s, kl = q.shape[2], k.shape[2]
    if n_rep > 1:
        # GQA by broadcasting; enable_gqa kernels exist but the repeat keeps CPU kernels on their fast path.
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if mask is None:
        is_causal = causal_if_no_mask and s > 1
        if is_causal and s != kl:
            mask = torch.ones(s, kl, dtype=torch.bool, device=q.device).tril(kl - s)
            is_causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def text_attention_choice(op: str, q: torch.Tensor, k: torch.Tensor) -> str | None:
    """`choose`'s pick for decode_attention (one query per row) or prefill_attention (S >= 64 queries, no mask)
    for q (B,Hq,S,D), k (B,Hkv,K,D), None for today's rule (the kernel where it runs)."""
    if q.dtype is not torch.bfloat16 or (torch.is_grad_enabled() and q.requires_grad):
        return None
    return attention_choice(op, q.shape[0] if op == "decode_attention" else q.shape[2], q.shape[1], k.shape[1],
                            q.shape[3])


def attention_choice(op: str, rows: int, hq: int, hkv: int, d: int) -> str | None:
    """text_attention_choice from the sizes: `rows` decoding rows, or `rows` prefill queries."""
    rep = choose.rows_class(op, rows)
    return choose.decide(op, (rep, hq, hkv, d), lambda: _text_attention_trial(op, rep, hq, hkv, d),
                         timed=hq * d >= choose.MIN_WIDTH)


def _text_attention_trial(op: str, rows: int, hq: int, hkv: int, d: int) -> choose.Trial:
    """Random q/k/v of the class's shape: decoding `rows` rows over 512 cached keys, or a causal prefill of `rows`
    tokens of one row."""
    b, s, kl = (rows, 1, 512) if op == "decode_attention" else (1, rows, rows)
    q = torch.randn(b, hq, s, d, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, kl, d, dtype=torch.bfloat16) for _ in range(2))
    scale = d ** -0.5
    ops = KernelOps("trial")
    kern = ops.decode_attention if op == "decode_attention" else \
        (lambda q, k, v, mask, scale: ops.prefill_attention(q, k, v, scale))
    cands = {"kernel": lambda: kern(q, k, v, None, scale), "torch": lambda: torch_sdpa(q, k, v, None, scale)}
    return choose.Trial(cands, lambda: torch_sdpa(q.float(), k.float(), v.float(), None, scale))


class VarlenBatch(NamedTuple):
    """Where the real tokens of a padded query block (B,S) and key block (B,K) sit, for the FlashAttention-2
    varlen path; built once per forward (`varlen_batch`) and reused by every layer, so layers never sync.

    q_index (Tq,) / k_index (Tk,): flat indices into B*S / B*K of the real queries / keys (None = all of them);
    cu_q, cu_k (B+1,) int32 cumulative lengths on the device; max_q, max_k host ints."""
    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def varlen_batch(key_valid: torch.Tensor, query_valid: torch.Tensor, all_valid: bool = False) -> VarlenBatch:
    """key_valid (B,K), query_valid (B,S) booleans. `all_valid` (no pads, every row's past alike) skips the
    index computation and its host syncs."""
    (b, s), kl, dev = query_valid.shape, key_valid.shape[1], query_valid.device
    if all_valid:
        rows = torch.arange(b + 1, dtype=torch.int32, device=dev)
        return VarlenBatch(None, None, rows * s, rows * kl, s, kl)
    q_lens, k_lens = query_valid.sum(-1), key_valid.sum(-1)
    max_q, max_k = torch.stack([q_lens.max(), k_lens.max()]).tolist()
    return VarlenBatch(query_valid.reshape(-1).nonzero().squeeze(1), key_valid.reshape(-1).nonzero().squeeze(1),
                       F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0)),
                       F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0)), max_q, max_k)


def flash_text_attention(q, k, v, scale, varlen: VarlenBatch):
    """FlashAttention-2 varlen path: pads dropped from queries and keys, causal mask aligned to each row's last
    key (query i of a row with Sq real queries and Sk real keys sees keys up to Sk - Sq + i).

    q (B,Hq,S,D), k/v (B,Hkv,K,D). Returns (B,Hq,S,D) with zeros at pad queries."""
    flash_attn_varlen_func = _flash_varlen()  # checked by check_backend
    b, hq, s, d = q.shape
    hkv, kl = k.shape[1], k.shape[2]
    qt = q.transpose(1, 2).reshape(b * s, hq, d)
    kt, vt = (t.transpose(1, 2).reshape(b * kl, hkv, d) for t in (k, v))
    if varlen.q_index is not None:
        qt = qt.index_select(0, varlen.q_index)
    if varlen.k_index is not None:
        kt, vt = kt.index_select(0, varlen.k_index), vt.index_select(0, varlen.k_index)
    out = flash_attn_varlen_func(qt, kt, vt, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k,
                                 softmax_scale=scale, causal=True)
    if varlen.q_index is not None:
        out = q.new_zeros(b * s, hq, d).index_copy_(0, varlen.q_index, out)
    return out.view(b, s, hq, d).transpose(1, 2)


def text_attention(impl: str, q, k, v, mask, scale, key_valid=None, query_valid=None,
                   varlen: VarlenBatch | None = None, ops: TorchOps | None = None):
    """q (B,Hq,S,D), k/v (B,Hkv,K,D), mask (B,1,S,K) bool or None (causal). flash_attention_2 on CUDA uses
    `varlen`, else builds it from key_valid (B,K) / query_valid (B,S) (None = all real)."""
    if impl == "flash_attention_2" and q.is_cuda:
        if varlen is None:
            b, s, kl = q.shape[0], q.shape[2], k.shape[2]
            all_valid = key_valid is None and query_valid is None
            if key_valid is None:
                key_valid = torch.ones(b, kl, dtype=torch.bool, device=q.device)
            if query_valid is None:
                query_valid = torch.ones(b, s, dtype=torch.bool, device=q.device)
            varlen = varlen_batch(key_valid, query_valid, all_valid)
        return flash_text_attention(q, k, v, scale, varlen)
    if impl == "eager":
        return eager_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask, scale, ops=ops)


class VisionSegments(NamedTuple):
    """The block-diagonal segments of a vision sequence, computed once per tower forward: `bounds` the
    num_segments+1 offsets and `max_len` on the host, `cu_seqlens` int32 on the activations' device (so no
    layer copies or syncs)."""
    bounds: list[int]
    max_len: int
    cu_seqlens: torch.Tensor


def vision_segments(cu_seqlens, device) -> VisionSegments:
    """VisionSegments from int32 offsets (num_segments+1,) (normally a CPU tensor); passes one through."""
    if isinstance(cu_seqlens, VisionSegments):
        return cu_seqlens
    bounds = cu_seqlens.tolist()
    max_len = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    return VisionSegments(bounds, max_len, cu_seqlens.to(device=device, dtype=torch.int32))


def vision_attention(impl: str, q, k, v, cu_seqlens, scale: float, fp32: bool | None = None) -> torch.Tensor:
    """Block-diagonal attention. q/k/v (N, H, D); cu_seqlens: VisionSegments, or int32 offsets
    (num_segments+1,). Returns (N, H, D). fp32: bf16 CPU SDPA on fp32 operands (None: where the CPU has no
    native bf16 matmul; the vision tower passes `choose`'s pick)."""
    n, h, d = q.shape
    if fp32 is None:
        fp32 = not has_native_bf16_matmul()
    if impl == "sdpa" and q.device.type == "cpu" and q.dtype == torch.bfloat16 and fp32 \
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # No native bf16 matmul on this CPU: torch's fp32 SDPA is ~20 % faster than its bf16 one (Zen 3).
        return vision_attention(impl, q.float(), k.float(), v.float(), cu_seqlens, scale).to(torch.bfloat16)
    seg = vision_segments(cu_seqlens, q.device)
    if impl == "flash_attention_2" and q.is_cuda:
        flash_attn_varlen_func = _flash_varlen()
        return flash_attn_varlen_func(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len,
                                      softmax_scale=scale, causal=False)

    attend = eager_attention if impl == "eager" else sdpa_attention
    starts = seg.bounds[:-1]
    lens = [b - a for a, b in zip(starts, seg.bounds[1:])]
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for i, length in enumerate(lens):
        by_len.setdefault(length, []).append(i)
    for length, segs in by_len.items():
        if len(segs) == len(lens):
            # One length for everything (one image, or all frames of videos of one size): a pure view.
            idx = None
            qs, ks, vs = (t.view(len(segs), length, h, d) for t in (q, k, v))
        else:
            idx = torch.cat([torch.arange(starts[i], starts[i] + length) for i in segs]).to(q.device)
            qs, ks, vs = (t.index_select(0, idx).view(len(segs), length, h, d) for t in (q, k, v))
        o = attend(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), None, scale,
                   causal_if_no_mask=False)
        o = o.transpose(1, 2).reshape(-1, h, d)
        if idx is None:
            return o
        out.index_copy_(0, idx, o)
    return out
