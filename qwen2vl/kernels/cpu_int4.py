"""The 4-bit GEMV kernel's wrapper (cpu_int4.c, in both library builds): y (rows, N) = x (rows, K) @ W.T for 1-8
bf16 activation rows, W group-wise 4-bit in `quantization.int4`'s packed layout. AVX512-BF16 CPUs run the
bf16 dot-product variant (each nibble made bf16 exactly by one bit operation), the AVX2 build an fp32 FMA
variant. Needs K % 128 == 0 and group_size % 128 == 0; anything else is None (the caller dequantizes)."""
from __future__ import annotations

import torch

from . import cpu

MAX_ROWS = cpu.MAX_ROWS


def usable(k: int, group_size: int) -> bool:
    """Whether the kernel handles this shape on this CPU (the library built, a variant for its ISA)."""
    return k % 128 == 0 and group_size % 128 == 0 and _fn() is not None


def _fn():
    if cpu.flavour() == "avx2":
        return cpu.kernel("gemv_q4_avx2")
    return cpu.kernel("gemv_q4_avx512bf16") if cpu.has_avx512bf16() else None


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor | None:
    """x (..., K) bf16 on the CPU, 1..MAX_ROWS rows -> (..., N) bf16, or None where the kernel cannot run."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    fn = _fn()
    if (fn is None or x.dtype is not torch.bfloat16 or x.device.type != "cpu" or not 0 < rows <= MAX_ROWS
            or k % 128 or group_size % 128 or qweight.shape[1] * 2 != k or qweight.device.type != "cpu"):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    n = qweight.shape[0]
    xin = x.reshape(rows, k).contiguous()
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    rc = fn(xin.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(),
            rows, n, k, group_size, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"4-bit GEMV failed with code {rc}")
    return out.view(*x.shape[:-1], n)


def dequantize_bf16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
                    group_size: int) -> torch.Tensor | None:
    """W (N, K) bf16 from packed rows (the prefill path's tile), or None where the kernel does not apply."""
    fn = cpu.kernel("dequant_q4_bf16")
    if fn is None or k % 128 or group_size % 128 or qweight.device.type != "cpu" or qweight.shape[1] * 2 != k \
            or not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        return None
    out = torch.empty(qweight.shape[0], k, dtype=torch.bfloat16)
    if fn(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), qweight.shape[0], k,
          group_size, torch.get_num_threads()) != 0:
        return None
    return out
