"""x @ W.T for a weight held quantized, on the many-rows path: W is dequantized into x's dtype a tile of output rows
at a time (never a whole float copy of a big weight) and multiplied by the device's own matmul (oneDNN / AMX on
CPU, cuBLAS on GPU), which is correct on every device by construction. Shared by the int4 and int8 layers."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

WEIGHT_TILE = 1 << 23     # weight elements dequantized at a time (16 MB of bf16)
DEQUANTIZE_MIN_ROWS = 64  # from this many rows the float matmul beats the integer GEMV / GEMM paths


def dequantized_matmul(x: torch.Tensor, out_features: int, in_features: int,
                       dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """x (..., in) @ W.T -> (..., out); `dequant_rows(n0, n1, dtype)` gives W[n0:n1] (may be a reused buffer:
    it is consumed at once)."""
    tile = max(1, WEIGHT_TILE // max(in_features, 1))
    if out_features <= tile:
        return F.linear(x, dequant_rows(0, out_features, x.dtype))
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    for n0 in range(0, out_features, tile):
        n1 = min(out_features, n0 + tile)
        y[..., n0:n1] = F.linear(x, dequant_rows(n0, n1, x.dtype))
    return y
