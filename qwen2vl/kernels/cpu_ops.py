"""When the attention and elementwise kernels apply (bf16; the AVX2 build lacks the vision and prefill attention
kernels): the vision tower's fused rotary + attention, text prefill / decoding attention, the decoder's RMSNorm,
rotary, SiLU * up, and one whole decoding step through the decoder stack (`decode_layers`). Each checks its
kernel's conditions and calls its `torch.library` op (ops.py), or returns None / False where the kernel cannot run;
`backend.py` then runs the PyTorch reference."""
from __future__ import annotations

import torch

from .build import has_avx512bf16, kernel, library
from .cpu import has_bf16_gemv
from .cpu_int4 import intdot_isa
from .ops import DECODE_KINDS, DECODE_LAYER_WEIGHTS

_ops = torch.ops.qwen2vl


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
                          segment: tuple[int, int], queries: tuple[int, int], out: torch.Tensor,
                          heads: tuple[int, int] | None = None) -> bool:
    """Rows `queries` = [q0, q1) (absolute, inside `segment` = [a, b)) of `vision_attention` into out (N, H*D),
    attending to all keys of the segment, for heads [h0, h1) (default all); each (query row, head) has the same
    bits as in a call over the whole segment. False when the kernel cannot run (nothing written)."""
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
    (a, b), (q0, q1), (h0, h1) = segment, queries, heads or (0, num_heads)
    _ops.vision_attention_.default(out, qkv, cos.float(), sin.float(), num_heads, scale, a, b, q0, q1, h0, h1)
    return True


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
    return _ops.decode_attention.default(q, k, v, m, scale)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Causal attention of S new tokens per row over past + S cached keys, every row alike (no padding), bf16 on
    CPU; None when the kernel cannot run.

    q (B, Hq, S, D); k/v (B, Hkv, K, D) with K >= S, any strides with D contiguous. Returns (B, Hq, S, D) bf16 (a
    transposed view of a (B, S, Hq, D) buffer, so the output projection needs no copy)."""
    b, hq, s, d = q.shape
    hkv, klen = k.shape[1], k.shape[2]
    if s < 1 or klen < s or not has_avx512bf16() or not _bf16_attention_inputs(q, k, v):
        return None
    return _ops.prefill_attention.default(q, k, v, scale)


def bias_quick_gelu_(x: torch.Tensor, bias: torch.Tensor) -> bool:
    """In place x = quick_gelu(x + bias) for a contiguous bf16 CPU x (rows, N); False (x untouched) when the
    kernel cannot run."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous():
        return False
    if x.shape[1] % 16 or bias.shape != (x.shape[1],) or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if kernel("bias_quick_gelu") is None:
        return False
    _ops.bias_quick_gelu_.default(x, bias.detach().float().contiguous())
    return True


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
    return _ops.rms_norm.default(x, weight, eps)


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
    if library() is None or head_dim % 2:
        return None
    return _ops.rope.default(x, cos, sin, head_dim)


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
    if library() is None:
        return False
    _ops.silu_mul_.default(gate, up)
    return True


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
    if not has_bf16_gemv() or not keys or x.dim() != 2 or x.device.type != "cpu" or weights[11].dim() != 2:
        return False
    b, h = x.shape
    hkv, d = keys[0].shape[1], keys[0].shape[3]
    packed = quant is not None and quant[0][6].startswith("int4")  # down_proj's weight: two columns per byte
    qd, inter = num_heads * d, weights[11].shape[1] * (2 if packed else 1)
    if b > 8 or h % 32 or inter % 32 or qd % 32 or d % 16 or d > 128 or num_heads % hkv:
        return False  # the kernels' own shape conditions (cpu_layer.c)
    kinds, qparams, group, use512 = [], [], 0, 0
    if quant is not None:
        names, scales, zeros, group = quant
        kinds = [DECODE_KINDS[k] for k in names]
        qparams = [t for pair in zip(scales, zeros) for t in pair]
        use512 = intdot_isa() or 0
    try:  # the op checks every tensor before anything is written: a ValueError means "does not apply here"
        _ops.decode_layers_.default(x, weights, keys, values, list(slots), kv_len, mask, cos, sin, num_heads, eps,
                                    scale, kinds, qparams, group, use512)
    except ValueError:
        return False
    return True
