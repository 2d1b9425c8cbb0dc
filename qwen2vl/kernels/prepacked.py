"""The vision tower's linear (`PrepackedLinear`): many rows every call, so oneDNN's prepacked weight, F.linear or
fp32 on widened operands, whichever `choose` measured fastest for the shape (today's rule: widened where bf16 is
emulated, else prepacked)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import settings
from . import choose, cpu

PREPACK_MIN_ROWS = 64


class PrepackedLinear(torch.nn.Linear):
    """nn.Linear (same parameters and state-dict keys) for layers that always see many rows (the vision tower):
    bf16 inference on CPU multiplies by oneDNN's prepacked (blocked) copy of the weight, made on first use and
    rebuilt when the weight changes; 10-15 % faster than F.linear, which re-blocks the weight on every call, and
    bit-identical. Costs one extra copy of these weights in memory (QWEN2VL_DISABLE_PREPACK=1 turns it off).
    Which of prepacked / F.linear / widened runs for a shape is `choose`'s "vision_linear" decision."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepack = not settings().disable_prepack  # read when the model is built

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if not self.prepack or x.device.type != "cpu" or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
            return None
        if x.dim() != 2 or x.shape[0] < PREPACK_MIN_ROWS or (torch.is_grad_enabled() and
                                                            (x.requires_grad or w.requires_grad)):
            return None
        try:
            version = w._version
        except RuntimeError:  # inference tensors (created under inference_mode) have no version counter
            version = -1
        key = (w.data_ptr(), version, tuple(w.shape))
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            except (RuntimeError, AttributeError):  # no oneDNN in this torch build
                packed = None
            cached = self.__dict__["_packed"] = (key, packed)
        return cached[1]

    def choice(self, x: torch.Tensor, bias: torch.Tensor | None) -> str | None:
        """What `choose` picked for this shape ("vision_linear"), None for today's rule."""
        w = self.weight
        if x.device.type != "cpu" or x.dtype is not torch.bfloat16 or w.dtype is not torch.bfloat16 or \
                x.dim() != 2 or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return None
        n, k = w.shape
        rep = choose.rows_class("vision_linear", x.shape[0])
        return choose.decide("vision_linear", (rep, n, k, int(bias is not None)), lambda: self._trial(rep, bias),
                             timed=x.shape[0] >= PREPACK_MIN_ROWS and n * k >= choose.MIN_WEIGHT)

    def _trial(self, rows: int, bias: torch.Tensor | None) -> choose.Trial:
        w = self.weight
        x = torch.randn(rows, w.shape[1], dtype=torch.bfloat16)
        c = min(w.shape[0], 1024)
        b = None if bias is None else bias[:c].float()
        cands = {"torch": lambda: F.linear(x, w, bias), "onednn": lambda: self._onednn(x, bias)}
        if cpu.has_native_bf16_matmul():  # fp32 on widened operands only pays where bf16 is emulated
            today = ("onednn", "torch")
        else:
            cands["widened"], today = (lambda: cpu._widened(x, w, bias)), ("widened",)
        return choose.Trial(cands, lambda: F.linear(x[:8].float(), w[:c].float(), b), lambda y: y[:8, :c].float(),
                            today)

    def _onednn(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        packed = self.packed_weight(x)
        return None if packed is None else torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        bias = self.bias if with_bias else None
        route = self.choice(x, bias)
        if route == "torch":
            return F.linear(x, self.weight, bias)
        y = cpu._widened(x, self.weight, bias) if route == "widened" else self._onednn(x, bias) if route else None
        if y is not None:
            return y
        # today's rule: no native bf16 matmul here: fp32 on widened operands; else the prepacked weight
        y = cpu.widened_linear(x, self.weight, bias)
        if y is None:
            y = self._onednn(x, bias)
        return y if y is not None else F.linear(x, self.weight, bias)
