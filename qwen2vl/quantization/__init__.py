"""Weight-only quantization of the text decoder: int8 (per output channel, `int8.py`) and group-wise int4
(`int4.py`, with activation-aware scaling from `awq.py`). `quantize_model` is the entry point; save / load of a
quantized model is in `serialization.py`."""
from __future__ import annotations

from .int4 import Int4WeightOnlyLinear
from .int8 import Int8WeightOnlyLinear
from .model import SUPPORTED, quantize_model

__all__ = ["Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "SUPPORTED", "quantize_model"]
