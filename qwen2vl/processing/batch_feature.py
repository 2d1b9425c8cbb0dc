"""`BatchFeature`: the dict-like batch that processors return and models accept (`model(**batch)`)."""
from __future__ import annotations

from collections import UserDict
from typing import Any

import numpy as np
import torch


def _to_tensor(value: Any, tensor_type: str | None) -> Any:
    if tensor_type is None or value is None:
        return value
    if tensor_type not in ("pt", "np"):
        raise ValueError(f"Unsupported return_tensors={tensor_type!r}; use 'pt', 'np' or None.")
    if tensor_type == "pt":
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        return torch.tensor(value)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


class BatchFeature(UserDict):
    """Holds processor outputs; attribute access (`batch.input_ids`) and `.to(device|dtype)` like transformers.

    `.to(dtype)` only casts floating-point tensors (pixel values), never ids, masks or grids.
    """

    def __init__(self, data: dict | None = None, tensor_type: str | None = None):
        super().__init__({k: _to_tensor(v, tensor_type) for k, v in (data or {}).items()})

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        out = {}
        for key, value in self.data.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value
            elif value.is_floating_point():
                out[key] = value.to(*args, **kwargs)
            else:
                # Integer tensors move device but never change dtype.
                device = kwargs.get("device")
                for a in args:
                    if isinstance(a, (str, torch.device)):
                        device = a
                out[key] = value.to(device) if device is not None else value
        self.data = out
        return self
