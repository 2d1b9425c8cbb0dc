"""Weight-only int8 quantization of the text decoder (and LM head) for faster, memory-bound decoding.

Each Linear weight W (out, in) becomes int8 Q with one scale per output channel: W ≈ Q * s[:, None],
s = max|W_row| / 127 (symmetric, round-to-nearest). Activations stay in the model dtype. On CPU the matmul
runs in `torch._weight_int8pack_mm` (int8 weights read once, dequantised in registers), which halves the bytes
read per decoded token versus bf16. Few rows (decoding) run the CPU kernel `choose` picks ("int8_gemv": the
exact bf16-widening kernel, torch's op, or "intdot": activations quantized to int8 per 32 columns, integer dot
products). The vision tower stays in full precision: it is compute-bound.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import choose
from ..kernels import cpu as cpu_kernels
from ..kernels import cpu_int4
from .tiles import DEQUANTIZE_MIN_ROWS, dequantized_matmul

QUANTIZE_ROWS = 1 << 14  # output rows quantized at a time (bounds the fp32 temporaries)


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # many rows (the vision tower: 512-row chunks): dequantize tiles into the activation dtype and use the
        # device's float matmul (oneDNN bf16: ~2.4x torch's int8 GEMM at 512 x 1280 x 5120 on Zen 4); the decoder
        # keeps `_weight_int8pack_mm` (exact scales) for its prefill
        self.dequantize_many_rows = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8WeightOnlyLinear":
        """One scale per output row (absmax / 127), `QUANTIZE_ROWS` rows at a time: the scales are per row, so the
        result is the same, and the fp32 temporaries of a 151k-row LM head / embedding stay ~100 MB."""
        w = weight.detach()
        q = cls(w.shape[1], w.shape[0], bias is not None, w.dtype, w.device)
        for a in range(0, w.shape[0], QUANTIZE_ROWS):
            w32 = w[a:a + QUANTIZE_ROWS].float()
            scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            q.weight_int8[a:a + QUANTIZE_ROWS] = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
            q.scales[a:a + QUANTIZE_ROWS] = scales.to(w.dtype)
        if bias is not None:
            q.bias.data.copy_(bias.detach())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def choice(self, x: torch.Tensor) -> str | None:
        """`choose`'s "int8_gemv" pick for few rows of x (kernel / torch._weight_int8pack_mm), None: today's rule."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.device.type != "cpu" or x.dtype != self.scales.dtype or not 0 < rows <= 8 or self.in_features % 16:
            return None
        n, k = self.out_features, self.in_features
        return choose.decide("int8_gemv", (rows, n, k), lambda: self._trial(rows), timed=n * k >= choose.MIN_INT_WEIGHT)

    def _trial(self, rows: int) -> choose.Trial:
        x = torch.randn(rows, self.in_features, dtype=self.scales.dtype)
        w, s, c = self.weight_int8, self.scales, min(self.out_features, 1024)
        cands = {"kernel": lambda: cpu_kernels.linear_int8(x, w, s),
                 "torch": lambda: torch._weight_int8pack_mm(x, w, s),
                 "intdot": lambda: cpu_int4.linear_int8_intdot(x, w, s)}  # int8 activations: inexact
        ref = lambda: F.linear(x[:8].float(), w[:c].float() * s[:c].float()[:, None])  # noqa: E731
        return choose.Trial(cands, ref, lambda y: y[:8, :c].float(), ("kernel", "torch"))

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """`with_bias=False`: without the bias (the vision MLP adds it fused with its activation)."""
        y = self._matmul(x)
        return y if self.bias is None or not with_bias else y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1] if shape[-1] else 0
        if self.dequantize_many_rows and rows >= DEQUANTIZE_MIN_ROWS:
            return dequantized_matmul(x, self.out_features, self.in_features, self._dequant_rows)
        route = self.choice(x)
        y = cpu_int4.linear_int8_intdot(x, self.weight_int8, self.scales) if route == "intdot" else None
        if y is None and route != "torch":
            y = cpu_kernels.linear_int8(x, self.weight_int8, self.scales)
        if y is not None:  # few rows (decoding): the bandwidth-bound kernel
            return y
        x2 = x.reshape(-1, shape[-1])
        # The CPU kernel needs in_features % 16 == 0 (it crashes or returns NaN otherwise).
        if x2.device.type == "cpu" and x2.dtype == self.scales.dtype and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
        else:
            # Other devices: dequantise in the matmul's input (still reads int8 from memory once).
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _dequant_rows(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """W[n0:n1] in `dtype`, each product rounded once: in `dtype` itself where the scales have it (an int8 code
        and a bf16 / fp16 scale multiply exactly before that rounding; one pass less), else in fp32."""
        q, s = self.weight_int8[n0:n1], self.scales[n0:n1, None]
        return q.to(dtype) * s if s.dtype is dtype else (q.float() * s.float()).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"
