"""Weight-only int8: exact dequantisation math, top-1 agreement with the full-precision model, loading."""
import copy

import pytest
import torch

from qwen2vl import Qwen2VLForConditionalGeneration
from qwen2vl.quantization import Int8WeightOnlyLinear, quantize_model
from tiny import left_pad, pixels, sample, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 37])  # 37: the CPU kernel cannot run, the fallback path must
def test_int8_linear_matches_dequantized_weight(dtype, k):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 24, bias=True).to(dtype)
    q = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(5, 3, k, dtype=dtype)
    ref = torch.nn.functional.linear(x.float(), q.dequantized_weight().float(), lin.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(q(x).float(), ref, atol=tol, rtol=tol)
    # Quantisation error of the weight itself is at most half a step per channel.
    step = q.scales.float()[:, None]
    assert ((q.dequantized_weight().float() - lin.weight.float()).abs() <= step / 2 + 1e-3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_top1_agreement_at_least_98_percent(dtype):
    """Over a fixed set of prompts (text and image), the int8 model's argmax agrees with the full-precision
    model on >= 98% of positions."""
    model = tiny_model(seed=3, merge_size=2, mrope_section=(4, 2, 2), layers=2).to(dtype)
    qmodel = quantize_model(copy.deepcopy(model))
    seqs = [sample(30, [], 10, 2, seed=s) for s in range(6)]
    seqs += [sample(8, [("image", [1, 4, 4])], 12, 2, seed=10 + s) for s in range(2)]
    ids, mask = left_pad(seqs)
    grid = torch.tensor([[1, 4, 4]] * 2)
    pv = pixels(grid.tolist()).to(dtype)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, use_cache=False).logits
        b = qmodel(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, use_cache=False).logits
    real = mask.bool()
    agree = (a.argmax(-1) == b.argmax(-1))[real].float().mean().item()
    assert agree >= 0.98


def test_from_pretrained_int8_and_save_refused(tmp_path):
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    model.save_pretrained(tmp_path)
    q = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, quantization="int8")
    assert isinstance(q.lm_head, Int8WeightOnlyLinear)
    assert isinstance(q.model.language_model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert isinstance(q.model.visual.blocks[0].attn.qkv, torch.nn.Linear)
    with pytest.raises(ValueError, match="quantized"):
        q.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="not supported"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, quantization="int4")
