"""Attention and elementwise CPU kernels (bf16; the C library that `cpu.library()` builds, whose AVX2 build lacks
the vision and prefill attention kernels): the vision
tower's fused rotary + attention, text prefill / decoding attention, the decoder's RMSNorm, rotary, SiLU * up, and
one whole decoding step through the decoder stack (`decode_layers`). Each returns None / False where its kernel
cannot run, and the caller then uses torch ops."""
from __future__ import annotations

import ctypes

import torch

from .cpu import has_avx512bf16, has_bf16_gemv, kernel, library


def vision_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, scale: float,
                     cu_seqlens: list[int]) -> torch.Tensor | None:
    """Fused 2-D rotary + block-diagonal attention of the vision tower.

    qkv (N, 3*H*D) raw projection output (bf16 or fp32), cos/sin (N, D) fp32, cu_seqlens segment offsets.
    Returns (N, H*D) in qkv's dtype, or None when the kernel cannot run (the caller then uses SDPA).
    """
    qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(qkv.shape[0], qkv.shape[1] // 3, dtype=qkv.dtype)
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if not vision_attention_rows(qkv, cos, sin, num_heads, scale, (a, b), (a, b), out):
            return None
    return out


def vision_attention_rows(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, scale: float,
                          segment: tuple[int, int], queries: tuple[int, int], out: torch.Tensor) -> bool:
    """Rows `queries` = [q0, q1) (absolute, inside `segment` = [a, b)) of `vision_attention` into out (N, H*D),
    attending to all keys of the segment; each query row has the same bits as in a call over the whole segment.
    False when the kernel cannot run (nothing written)."""
    d = qkv.shape[1] // (3 * num_heads)
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.bfloat16) or d % 16 or d > 128:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:
        return False
    if kernel("vision_attention") is None:  # AVX512 build only
        return False
    is_bf16 = qkv.dtype == torch.bfloat16
    if is_bf16 and not has_avx512bf16():
        return False
    if not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and out.is_contiguous()):
        raise ValueError("vision_attention_rows needs contiguous qkv / cos / sin / out")
    cos, sin = cos.float(), sin.float()
    (a, b), (q0, q1) = segment, queries
    row_q, row_o = qkv.shape[1] * qkv.element_size(), out.shape[1] * out.element_size()
    rc = library().vision_attention(qkv.data_ptr() + a * row_q, cos.data_ptr() + a * d * 4,
                                    sin.data_ptr() + a * d * 4, out.data_ptr() + a * row_o, b - a, num_heads, d,
                                    ctypes.c_float(scale), int(is_bf16), torch.get_num_threads(), q0 - a, q1 - a)
    return rc == 0


def _bf16_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """q (B, Hq, S, D), k/v (B, Hkv, K, D) the text attention kernels take: bf16 on CPU, D % 16 == 0 and <= 128,
    Hq a multiple of Hkv, D contiguous, no autograd, kernels built."""
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    if q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    if d % 16 or d > 128 or hq % hkv or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return library() is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
    """Attention of one new token per row over the KV cache (bf16, CPU), or None when the kernel cannot run.

    q (B, Hq, 1, D); k/v (B, Hkv, K, D), views of the cache (strided rows are fine, D contiguous); mask (B, 1, 1, K)
    boolean (True = attend) or None (all K keys). Returns (B, Hq, 1, D) bf16."""
    b, hq, s, d = q.shape
    hkv, klen = k.shape[1], k.shape[2]
    if s != 1 or klen == 0 or not _bf16_attention_inputs(q, k, v):
        return None
    m = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.numel() != b * klen:
            return None
        m = mask.reshape(b, klen).to(torch.uint8).contiguous()
    out = torch.empty(b, hq, 1, d, dtype=torch.bfloat16)
    rc = library().decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if m is None else m.data_ptr(),
                                    out.data_ptr(), b, hq, hkv, klen, d, q.stride(0), q.stride(1),
                                    k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                    ctypes.c_float(scale), torch.get_num_threads())
    return out if rc == 0 else None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Causal attention of S new tokens per row over past + S cached keys, every row alike (no padding), bf16 on
    CPU; None when the kernel cannot run.

    q (B, Hq, S, D); k/v (B, Hkv, K, D) with K >= S, any strides with D contiguous. Returns (B, Hq, S, D) bf16 (a
    transposed view of a (B, S, Hq, D) buffer, so the output projection needs no copy)."""
    b, hq, s, d = q.shape
    hkv, klen = k.shape[1], k.shape[2]
    if s < 1 or klen < s or not has_avx512bf16() or not _bf16_attention_inputs(q, k, v):
        return None
    out = torch.empty(b, s, hq, d, dtype=torch.bfloat16)
    rc = library().prefill_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, hq, hkv, s, klen, d,
                                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                     v.stride(0), v.stride(1), v.stride(2), ctypes.c_float(scale),
                                     torch.get_num_threads())
    return out.transpose(1, 2) if rc == 0 else None


def bias_quick_gelu_(x: torch.Tensor, bias: torch.Tensor) -> bool:
    """In place x = quick_gelu(x + bias) for a contiguous bf16 CPU x (rows, N); False (x untouched) when the
    kernel cannot run."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous():
        return False
    if x.shape[1] % 16 or bias.shape != (x.shape[1],) or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if kernel("bias_quick_gelu") is None:
        return False
    b = bias.detach().float().contiguous()
    return library().bias_quick_gelu(x.data_ptr(), b.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads()) == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The decoder's RMSNorm for bf16 x (..., N) and bf16 weight on CPU in one kernel call (the reference's
    roundings: fp32 statistics, bf16 before the weight multiply); None when the kernel cannot run."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return None
    n = x.shape[-1]
    if n % 16 or not x.is_contiguous() or not weight.is_contiguous() or weight.shape != (n,):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    if library() is None:
        return None
    out = torch.empty_like(x)
    rc = library().rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, ctypes.c_float(eps),
                            torch.get_num_threads())
    return out if rc == 0 else None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor | None:
    """The decoder's rotary embedding in one kernel call: x (B,S,H*D) bf16 projection output, cos/sin (B,S,D)
    bf16 → per head x*cos + rotate_half(x)*sin, bit-identical to those bf16 torch ops; None when it cannot run."""
    if x.dtype is not torch.bfloat16 or cos.dtype is not torch.bfloat16 or sin.dtype is not torch.bfloat16:
        return None
    if x.device.type != "cpu" or x.dim() != 3 or cos.shape != (*x.shape[:2], head_dim) or sin.shape != cos.shape:
        return None
    if x.shape[-1] % head_dim or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty_like(x)
    rows = x.shape[0] * x.shape[1]
    rc = lib.rope_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), rows, x.shape[-1] // head_dim,
                       head_dim, torch.get_num_threads())
    return out if rc == 0 else None


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """In place gate = silu(gate) * up for contiguous bf16 CPU tensors of one shape, bit-identical to torch's bf16
    `F.silu(gate).mul_(up)` (fp32 SiLU, rounded, then the product rounded); False (gate untouched) when the kernel
    cannot run."""
    if gate.device.type != "cpu" or gate.dtype is not torch.bfloat16 or up.dtype is not torch.bfloat16:
        return False
    if gate.shape != up.shape or gate.numel() % 16 or not (gate.is_contiguous() and up.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return False
    lib = library()
    return lib is not None and lib.silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel(), torch.get_num_threads()) == 0


# weights of one decoder layer, in the order cpu_layer.c reads them
DECODE_LAYER_WEIGHTS = ("ln1", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "ln2", "wg", "wu", "wd")


# quantized projections (cpu_layer.c's P_* kinds): the exact 4-bit kernel, the integer-dot-product 4-bit / int8 ones
DECODE_KINDS = {"bf16": 0, "int4": 1, "int4_intdot": 2, "int8_intdot": 3}
_PROJ_AT = (1, 3, 5, 7, 9, 10, 11)  # where q k v o gate up down sit in DECODE_LAYER_WEIGHTS


def decode_layers(x: torch.Tensor, weights: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor],
                  slots: list[int], kv_len: int, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, eps: float, scale: float, quant: tuple | None = None) -> bool:
    """One decoding step through L decoder layers in one kernel call, in place on x; the same kernels in the same
    order as the per-op path, so bit-identical to it. False (nothing written) when the kernel cannot run.

    x (B, H) bf16 contiguous, B <= 8; `weights` L x DECODE_LAYER_WEIGHTS: norms (H,), q (Hq*D, H) + bias, k / v
    (Hkv*D, H) + bias, o (H, Hq*D), gate / up (I, H), down (H, I), all contiguous bf16; keys/values per layer
    (B, Hkv, Smax, D) cache tensors, the new token of row b written at slot slots[b]; attention over slots
    [0, kv_len) where mask (B, kv_len) uint8 (1 = attend; None = all); cos/sin (B, D) bf16 contiguous.
    quant: quantized projections, (kinds: L x 7 DECODE_KINDS names, scales: L x 7 fp32 tensors, zeros: L x 7 uint8
    tensors or None (int8), group size); their weights in `weights` are then the packed 4-bit / int8 tensors."""
    lib = library()
    if not has_bf16_gemv() or not keys or len(values) != len(keys):
        return False
    b, h = x.shape
    kc = keys[0]
    hkv, smax, d = kc.shape[1:]
    layers, n = len(keys), len(DECODE_LAYER_WEIGHTS)
    if len(weights) != layers * n or weights[n - 1].dim() != 2:
        return False
    packed = quant is not None and quant[0][6].startswith("int4")  # down_proj's weight: two columns per byte
    qd, inter = num_heads * d, weights[n - 1].shape[1] * (2 if packed else 1)
    shapes = [(h,), (qd, h), (qd,), (hkv * d, h), (hkv * d,), (hkv * d, h), (hkv * d,), (h, qd), (h,), (inter, h),
              (inter, h), (h, inter)] * layers
    dtypes = [torch.bfloat16] * len(shapes)
    if quant is not None:
        kinds, scales, zeros, group = quant
        if len(kinds) != layers * 7 or group <= 0 or any(w % 128 or w % group for w in (h, qd, inter)):
            return False
        for i, kind in enumerate(kinds):
            at = (i // 7) * n + _PROJ_AT[i % 7]
            out, k = shapes[at]
            if kind != "bf16":
                four = kind.startswith("int4")
                shapes[at], dtypes[at] = ((out, k // 2), torch.uint8) if four else ((out, k), torch.int8)
                want = [(scales[i], (out, k // group) if four else (out,), torch.float32)] + \
                    ([(zeros[i], (out, k // group), torch.uint8)] if four else [])
                if any(t is None or t.shape != sh or t.dtype is not dt or not t.is_contiguous() for t, sh, dt in want):
                    return False
    if any(t.shape != shape or t.dtype is not dt or t.device.type != "cpu" or not t.is_contiguous()
           for t, shape, dt in zip(weights, shapes, dtypes)):
        return False
    if (x.dtype is not torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous() or len(slots) != b
            or kc.shape[0] != b or not 0 < kv_len <= smax or max(slots) >= kv_len or cos.shape != (b, d)
            or sin.shape != (b, d) or not (cos.is_contiguous() and sin.is_contiguous())
            or cos.dtype is not torch.bfloat16 or sin.dtype is not torch.bfloat16
            or (mask is not None and (mask.dtype != torch.uint8 or mask.shape != (b, kv_len)
                                      or not mask.is_contiguous()))):
        return False
    if any(t.shape != kc.shape or t.stride() != kc.stride() or t.dtype is not torch.bfloat16
           or t.device.type != "cpu" or t.stride(-1) != 1 for t in keys + values):
        return False
    ptrs = (ctypes.c_void_p * (layers * n))(*[t.data_ptr() for t in weights])
    kp = (ctypes.c_void_p * layers)(*[t.data_ptr() for t in keys])
    vp = (ctypes.c_void_p * layers)(*[t.data_ptr() for t in values])
    strides = (ctypes.c_int64 * 6)(*kc.stride()[:3], *values[0].stride()[:3])
    qargs = (None, None, 0, 0)
    if quant is not None:
        from .cpu_int4 import intdot_isa

        kinds, scales, zeros, group = quant
        qp = [p for pair in zip(scales, zeros) for p in pair]
        qargs = ((ctypes.c_int32 * len(kinds))(*(DECODE_KINDS[k] for k in kinds)),
                 (ctypes.c_void_p * len(qp))(*[None if t is None else t.data_ptr() for t in qp]), group,
                 intdot_isa() or 0)
    rc = lib.decode_layers(x.data_ptr(), layers, ptrs, kp, vp, strides, (ctypes.c_int64 * b)(*slots), kv_len,
                           None if mask is None else mask.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                           b, h, inter, num_heads, hkv, d, eps, scale, torch.get_num_threads(), *qargs)
    if rc == -1:  # a kernel's shape precondition (checked before anything is written)
        return False
    if rc != 0:  # -3 out of memory, -2 a kernel failed after x / the cache were written: no way to fall back
        raise RuntimeError(f"decode_layers kernel failed with code {rc}")
    return True
