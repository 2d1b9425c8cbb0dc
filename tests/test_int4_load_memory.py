"""Loading a saved int4 checkpoint streams it: every quantized tensor goes into its module as stored, and no float
tensor the size of a quantized weight is ever made (a spy on every aten op run during `from_pretrained`). This is
what keeps the 2B's peak resident memory at ~1.08x its int4 files (benchmarks/bench_int4.py --rss)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qwen2vl import Qwen2VLForConditionalGeneration
from qwen2vl.quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_model
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class FloatOutputs(TorchDispatchMode):
    """Records (shape, dtype) of every floating-point tensor with storage an aten op returns while active (the
    model built on the meta device first makes meta tensors only: no memory)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and not a.is_meta}
        for t in tree_leaves(out):  # new memory only: views and in-place results share an input's storage
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and _storage(t) not in inputs:
                self.seen.append((tuple(t.shape), t.dtype))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def quantized_layers(model):
    return [m for m in model.modules() if isinstance(m, (Int4WeightOnlyLinear, Int8WeightOnlyLinear))]


@pytest.mark.parametrize("options", [{}, {"embedding": "int4", "vision": "int8"}])
def test_loading_int4_makes_no_float_copy_of_quantized_weights(tmp_path, options):
    # intermediate 384: no decoder weight shares its shape with a float tensor of the model
    model = tiny_model(mrope_section=(16, 8, 8), vocab=300, intermediate=384).to(torch.bfloat16)
    quantize_model(model, "int4", int4_method="rtn", **options).save_pretrained(tmp_path)
    spy = FloatOutputs()
    with spy:
        back = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype="bfloat16", progress=False)
    layers = quantized_layers(back)
    assert len(layers) >= 2 * 7 + 1
    # what the model holds in floating point may be made once (the copy out of the mapped file); nothing else
    held = {(tuple(t.shape), t.dtype) for t in (*back.parameters(), *back.buffers()) if t.is_floating_point()}
    smallest = min(m.out_features * m.in_features // 2 for m in layers)  # bytes of the smallest packed weight
    made = [(s, d) for s, d in spy.seen if (s, d) not in held and torch.Size(s).numel() >= smallest]
    assert not made, f"float tensors made while loading: {made[:5]}"
    for m in layers:  # the codes went in as stored: integer tensors
        codes = m.qweight if isinstance(m, Int4WeightOnlyLinear) else m.weight_int8
        assert not codes.is_floating_point() and not codes.is_meta
