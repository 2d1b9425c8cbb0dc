"""Attention backends: "sdpa" (default), "eager", "flash_attention_2".

Text attention takes q (B,Hq,S,D), k/v (B,Hkv,K,D) and a boolean mask (B,1,S,K) (True = attend) or None
meaning plain causal over the last S of K keys. Vision attention is block-diagonal over `cu_seqlens`
segments: equal-length segments are stacked into one batched call (no dense N x N mask, no loop per image).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_kernels


BACKENDS = ("sdpa", "eager", "flash_attention_2")


def check_backend(name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error for an unknown backend or for flash-attention where it cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation must be one of {BACKENDS}, got {name!r}")
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package "
                         "(pip install flash-attn); use 'sdpa' otherwise.")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"attn_implementation='flash_attention_2' runs on CUDA devices only, got {device}; "
                         "use 'sdpa' on CPU.")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_implementation='flash_attention_2' needs float16 or bfloat16, got {dtype}.")


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(q, k, v, mask, scale, causal_if_no_mask=True):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None and causal_if_no_mask and q.shape[2] > 1:
        s, kl = q.shape[2], k.shape[2]
        mask = torch.ones(s, kl, dtype=torch.bool, device=q.device).tril(kl - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask, scale, causal_if_no_mask=True):
    n_rep = q.shape[1] // k.shape[1]
    s, kl = q.shape[2], k.shape[2]
    if s == 1 and q.device.type == "cpu" and causal_if_no_mask:
        # Decoding on CPU: torch's SDPA has a large fixed cost per (row, head); the kernel reads each KV head once.
        o = cpu_kernels.decode_attention(q, k, v, mask, scale)
        if o is not None:
            return o
    if s >= 64 and mask is None and causal_if_no_mask and q.device.type == "cpu":
        # Prefill on CPU (rows alike): bf16 flash kernel, several times faster than CPU SDPA without AMX.
        o = cpu_kernels.prefill_attention(q, k, v, scale)
        if o is not None:
            return o
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


def flash_text_attention(q, k, v, mask, scale, key_valid, query_valid):
    """flash-attn varlen path: drop pads from queries and keys, bottom-right aligned causal mask.

    key_valid (B,K), query_valid (B,S) booleans. Returns (B,Hq,S,D) with zeros at pad queries.
    """
    from flash_attn import flash_attn_varlen_func  # optional dependency, checked by check_backend

    b, hq, s, d = q.shape
    qt = q.transpose(1, 2)[query_valid]                       # (Tq, Hq, D)
    kt = k.transpose(1, 2)[key_valid]                         # (Tk, Hkv, D)
    vt = v.transpose(1, 2)[key_valid]
    cu_q = F.pad(query_valid.sum(-1).cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(key_valid.sum(-1).cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(qt, kt, vt, cu_q, cu_k, int(query_valid.sum(-1).max()),
                                 int(key_valid.sum(-1).max()), softmax_scale=scale, causal=True)
    full = q.new_zeros(b, s, hq, d)
    full[query_valid] = out
    return full.transpose(1, 2)


def text_attention(impl: str, q, k, v, mask, scale, key_valid=None, query_valid=None):
    if impl == "flash_attention_2" and q.is_cuda:
        if key_valid is None:
            key_valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=q.device)
        if query_valid is None:
            query_valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
        return flash_text_attention(q, k, v, mask, scale, key_valid, query_valid)
    if impl == "eager":
        return eager_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask, scale)


def vision_attention(impl: str, q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Block-diagonal attention. q/k/v (N, H, D); cu_seqlens int32 (num_segments+1,). Returns (N, H, D)."""
    n, h, d = q.shape
    if impl == "flash_attention_2" and q.is_cuda:
        from flash_attn import flash_attn_varlen_func

        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        max_len = int(lens.max())
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=False)

    attend = eager_attention if impl == "eager" else sdpa_attention
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for i, length in enumerate(lens):
        by_len.setdefault(length, []).append(i)
    starts = cu_seqlens[:-1].tolist()
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
