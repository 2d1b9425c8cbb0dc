"""The 4-bit GEMV kernel's wrapper (cpu_int4.c, in both library builds): y (rows, N) = x (rows, K) @ W.T for 1-8
bf16 activation rows, W group-wise 4-bit in `quantization.int4`'s packed layout. AVX512-BF16 CPUs run the
bf16 dot-product variant (each nibble made bf16 exactly by one bit operation), the AVX2 build an fp32 FMA
variant. Needs K % 128 == 0 and group_size % 128 == 0; anything else is None (the caller dequantizes)."""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from . import build
from .ops import MAX_ROWS, int4_function

_ops = torch.ops.qwen2vl


def usable(k: int, group_size: int) -> bool:
    """Whether the kernel handles this shape on this CPU (the library built, a variant for its ISA)."""
    return k % 128 == 0 and group_size % 128 == 0 and _fn() is not None


@functools.cache
def _fn() -> str | None:
    """The variant this CPU runs (resolved once: reading the CPU flags costs ~0.4 ms, a decode step makes
    ~200 calls)."""
    return int4_function()


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor | None:
    """x (..., K) bf16 on the CPU, 1..MAX_ROWS rows -> (..., N) bf16, or None where the kernel cannot run."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (_fn() is None or x.dtype is not torch.bfloat16 or x.device.type != "cpu" or not 0 < rows <= MAX_ROWS
            or k % 128 or group_size % 128 or qweight.shape[1] * 2 != k or qweight.device.type != "cpu"):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    out = _ops.gemv_int4.default(x.reshape(rows, k).contiguous(), qweight, scales, zeros, group_size)
    return out.view(*x.shape[:-1], qweight.shape[0])


_tiles = threading.local()


def _tile_buffer(numel: int) -> torch.Tensor:
    """This thread's reusable bf16 buffer for dequantized tiles: a fresh 16 MB tensor per call costs about as
    much as the dequantization itself (its pages are faulted in on every call)."""
    buf = getattr(_tiles, "buf", None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and outside inference mode
            buf = _tiles.buf = torch.empty(numel, dtype=torch.bfloat16)
    return buf[:numel]


def dequantize_bf16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
                    group_size: int, reuse: bool = False) -> torch.Tensor | None:
    """W (N, K) bf16 from packed rows (the prefill path's tile), or None where the kernel does not apply.
    reuse: written into this thread's tile buffer (valid until the next reuse call on this thread)."""
    if build.kernel("dequant_q4_bf16") is None or k % 128 or group_size % 128 or qweight.device.type != "cpu" or qweight.shape[1] * 2 != k \
            or not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        return None
    n = qweight.shape[0]
    out = _tile_buffer(n * k).view(n, k) if reuse else torch.empty(n, k, dtype=torch.bfloat16)
    _ops.dequant_int4_.default(out, qweight, scales, zeros, group_size, build.has_avx512bf16())
    return out


# ------------------------------------------------------------------------------------------ integer dot products
# cpu_intdot.c: the activations quantized to int8 once per call (blocks of 32 columns for int8 weights, 128 for
# 4-bit ones) and integer dot products (AVX512-VNNI, or AVX2 maddubs) with fp32 scales: not exact (the int8
# rounding of the activations, <= 1/254 of each block's largest |x| per element), so `choose` offers it as the
# "intdot" candidate of int8_gemv / int4_gemv, checked against its fp32 reference like every candidate.
@functools.cache
def intdot_isa() -> int | None:
    """1: the AVX512-VNNI variant, 0: the AVX2 one, None: neither runs here (no library or no AVX2)."""
    if build.kernel("gemv_q4_intdot") is None:
        return None
    flags = build.cpu_flags()
    if build.flavour() == "avx512" and {"avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        return 1
    return 0 if {"avx2", "fma"} <= flags else None


def _intdot_rows(x: torch.Tensor, kernel_k: int) -> int:
    """Activation rows the integer kernels take (bf16 on the CPU, 1..MAX_ROWS, the kernel's K % 128 == 0, no
    autograd), or 0."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (x.dtype is not torch.bfloat16 or x.device.type != "cpu" or not 0 < rows <= MAX_ROWS or kernel_k % 128
            or intdot_isa() is None or (torch.is_grad_enabled() and x.requires_grad)):
        return 0
    return rows


def linear_int4_intdot(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, use512: int | None = None) -> torch.Tensor | None:
    """`linear_int4` on int8-quantized activations (x (..., K) bf16 -> (..., N) bf16), or None where it cannot
    run. use512: force a variant (tests); None: this CPU's best."""
    k, kp = x.shape[-1], qweight.shape[1] * 2  # kp: columns padded to a multiple of 128 (zero codes)
    rows = _intdot_rows(x, kp)
    if not rows or group_size % 128 or kp % group_size or not 0 <= kp - k < 128 or qweight.device.type != "cpu":
        return None
    n = qweight.shape[0]
    xin = x.reshape(rows, k)
    xin = F.pad(xin, (0, kp - k)) if kp != k else xin.contiguous()  # zero activations: no term, no zero-point sum
    out = _ops.gemv_int4_intdot.default(xin, qweight, scales, zeros, group_size,
                                        intdot_isa() if use512 is None else use512)
    return out.view(*x.shape[:-1], n)


def linear_int8_intdot(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                       use512: int | None = None) -> torch.Tensor | None:
    """x (..., K) bf16 @ (weight int8 (N, K) * scales[:, None]).T in bf16 on int8-quantized activations, or None
    where it cannot run. use512 as in `linear_int4_intdot`."""
    k = x.shape[-1]
    rows = _intdot_rows(x, k)
    if not rows or weight.dtype is not torch.int8 or weight.shape[1] != k or not weight.is_contiguous() \
            or weight.device.type != "cpu":
        return None
    n = weight.shape[0]
    xin = x.reshape(rows, k).contiguous()
    s = scales.float().contiguous()
    out = _ops.gemv_int8_intdot.default(xin, weight, s, intdot_isa() if use512 is None else use512)
    return out.view(*x.shape[:-1], n)
