"""Parity of the core model with the transformers oracle (same weights, fp32).

Weights are redrawn with std 0.2 (`pair`) so attention is far from uniform and positions move the logits (the
default init left an h/w swap of the M-RoPE or vision rotary within tolerance). Tolerance: max |logits diff|
<= 1e-4 x max |reference logit| over every non-pad position; losses equal within 1e-5 relative.
Video cases keep t <= max(h, w)/merge, where our position rule equals transformers 5.x (see test_rope_index).
"""
import pytest
import torch

from tiny import IMG, VID, left_pad, mm_token_type_ids, oracle_from, pixels, sample, spread, tiny_model

ATOL = 1e-4

CASES = {
    "text": [],
    "one_image": [("image", [1, 4, 6])],
    "images_of_two_sizes": [("image", [1, 4, 4]), ("image", [1, 2, 6])],
    "video": [("video", [2, 4, 4])],
    "image_and_video": [("image", [1, 2, 4]), ("video", [2, 4, 2])],
}


def _grids(items, merge):
    img = [g for k, g in items if k == "image"]
    vid = [g for k, g in items if k == "video"]
    return (torch.tensor(img) if img else None), (torch.tensor(vid) if vid else None)


def _inputs(items, merge, seed=0):
    ids = torch.tensor([sample(4, items, 5, merge, seed=seed)])
    ig, vg = _grids(items, merge)
    kw = {}
    if ig is not None:
        kw.update(pixel_values=pixels(ig.tolist(), seed=seed), image_grid_thw=ig)
    if vg is not None:
        kw.update(pixel_values_videos=pixels(vg.tolist(), seed=seed + 1), video_grid_thw=vg)
    return ids, kw


@pytest.fixture(scope="module", params=[1, 2], ids=["merge1_tester", "merge2"])
def pair(request):
    merge = request.param
    mrope = (2, 1, 1) if merge == 1 else (4, 2, 2)
    model = spread(tiny_model(merge_size=merge, mrope_section=mrope, tie=(merge == 1)), 0.2)
    return merge, model, oracle_from(model, attn="eager")


def close(ours, ref) -> bool:
    return (ours - ref).abs().max().item() <= ATOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_loss_match_oracle(pair, case):
    merge, model, hf = pair
    ids, kw = _inputs(CASES[case], merge)
    labels = ids.clone()
    labels[(ids == IMG) | (ids == VID)] = -100
    with torch.no_grad():
        ours = model(input_ids=ids, labels=labels, use_cache=False, **kw)
        ref = hf(input_ids=ids, labels=labels, mm_token_type_ids=mm_token_type_ids(ids), **kw)
    assert close(ours.logits, ref.logits)
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, ref.loss.item())


def test_left_padded_mixed_batch_matches_oracle(pair):
    merge, model, hf = pair
    s_img = sample(2, [("image", [1, 4, 4])], 3, merge, seed=1)
    s_txt = sample(6, [], 2, merge, seed=2)
    s_two = sample(1, [("image", [1, 2, 2]), ("image", [1, 2, 4])], 1, merge, seed=3)
    ids, mask = left_pad([s_img, s_txt, s_two])
    grid = torch.tensor([[1, 4, 4], [1, 2, 2], [1, 2, 4]])
    pv = pixels(grid.tolist(), seed=4)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, use_cache=False)
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                 mm_token_type_ids=mm_token_type_ids(ids))
    real = mask.bool()
    assert close(ours.logits[real], ref.logits[real])
    # Each sample alone gives the same logits as inside the padded batch.
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([s_txt]), use_cache=False).logits[0]
    assert close(ours.logits[1][real[1]], alone)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_backends_agree(impl):
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    ids, kw = _inputs(CASES["images_of_two_sizes"], 2)
    with torch.no_grad():
        base = model(input_ids=ids, use_cache=False, **kw).logits
        model.set_attn_implementation(impl)
        other = model(input_ids=ids, use_cache=False, **kw).logits
        model.set_attn_implementation("sdpa")
    assert (base - other).abs().max().item() <= 1e-5


def test_incremental_decode_equals_full_forward_and_oracle():
    """Prefill + one-token steps with the KV cache and per-sequence deltas reproduce the full forward."""
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    hf = oracle_from(model, attn="eager")
    s0 = sample(2, [("image", [1, 4, 4])], 2, 2, seed=5)
    s1 = sample(5, [], 1, 2, seed=6)
    ids, mask = left_pad([s0, s1])
    grid = torch.tensor([[1, 4, 4]])
    pv = pixels(grid.tolist(), seed=7)
    extra = torch.tensor([[11, 12, 13], [21, 22, 23]])
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = model(input_ids=full_ids, attention_mask=full_mask, pixel_values=pv, image_grid_thw=grid,
                     use_cache=False).logits
        ref = hf(input_ids=full_ids, attention_mask=full_mask, pixel_values=pv, image_grid_thw=grid,
                 mm_token_type_ids=mm_token_type_ids(full_ids)).logits
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for k in range(extra.shape[1]):
            m = full_mask[:, : ids.shape[1] + k + 1]
            o = model(input_ids=extra[:, k:k + 1], attention_mask=m, past_key_values=cache)
            steps.append(o.logits[:, -1])
    n = ids.shape[1]
    for k, logit in enumerate(steps):
        assert (logit - full[:, n - 1 + k]).abs().max().item() <= ATOL
        assert (logit - ref[:, n - 1 + k]).abs().max().item() <= ATOL


def test_mismatched_image_tokens_raise_reference_message():
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    ids, kw = _inputs(CASES["images_of_two_sizes"], 2)
    kw["pixel_values"] = kw["pixel_values"][:16]
    kw["image_grid_thw"] = kw["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 7, features: 4"):
        model(input_ids=ids, use_cache=False, **kw)
    vids, vkw = _inputs(CASES["video"], 2)
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        model(input_ids=vids, use_cache=False)


def test_pixels_without_grid_raise():
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    ids, kw = _inputs(CASES["one_image"], 2)
    with pytest.raises(ValueError, match="without image_grid_thw"):
        model(input_ids=ids, pixel_values=kw["pixel_values"])


def test_get_image_features_per_item():
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    hf = oracle_from(model)
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    pv = pixels(grid.tolist())
    with torch.no_grad():
        feats = model.model.get_image_features(pv, grid)
        ref = hf.model.get_image_features(pv, grid).pooler_output
    assert [f.shape[0] for f in feats] == [4, 3]
    for a, b in zip(feats, ref):
        assert (a - b).abs().max().item() <= 1e-5
    assert feats.pooler_output is feats


@pytest.mark.parametrize("direction", ["transformers_to_ours", "ours_to_transformers"])
def test_cross_framework_checkpoints_give_equal_logits(tmp_path, direction):
    """A checkpoint written by one framework loads in the other with equal logits (image prompt, fp32)."""
    import transformers

    from qwen2vl import Qwen2VLForConditionalGeneration

    model = tiny_model(seed=7, merge_size=2, mrope_section=(4, 2, 2), tie=False)
    if direction == "transformers_to_ours":
        oracle_from(model).save_pretrained(tmp_path)
        ours = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
        theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    else:
        model.save_pretrained(tmp_path)
        ours = model
        theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    ids, kw = _inputs(CASES["image_and_video"], 2)
    with torch.no_grad():
        a = ours(input_ids=ids, use_cache=False, **kw).logits
        b = theirs(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), **kw).logits
    assert (a - b).abs().max().item() <= ATOL


def test_flash_attention_2_fails_clearly_on_cpu(tmp_path):
    from qwen2vl import Qwen2VLForConditionalGeneration

    tiny_model(merge_size=2, mrope_section=(4, 2, 2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="flash"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="paged")


def test_vision_mlp_row_chunks_match_oracle(monkeypatch):
    """Inference runs the vision tower's linears, MLP and merger over row chunks (512 rows on real images); with
    100-row chunks a 576-patch grid takes 6 of them, and the tower still equals transformers' (fp32, 1e-4)."""
    from qwen2vl.model import vision

    monkeypatch.setattr(vision, "ROWS", 100)
    model = tiny_model(mrope_section=(4, 2, 2))
    hf = oracle_from(model)
    grid = torch.tensor([[2, 16, 18]])
    pv = pixels(grid.tolist())
    with torch.no_grad():
        ours = model.model.visual(pv, grid)
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
    assert (ours - ref).abs().max().item() <= 1e-4


def test_bf16_vision_mlp_fused_activation_matches_torch_ops(monkeypatch):
    """bf16 inference: fc1 without bias + the fused bias/quick_gelu kernel gives the tower of the plain torch ops
    (fc1 with bias, quick_gelu) up to bf16 rounding."""
    from qwen2vl.kernels import cpu, cpu_ops
    from qwen2vl.model import vision

    monkeypatch.setattr(vision, "ROWS", 100)
    model = tiny_model(mrope_section=(4, 2, 2)).to(torch.bfloat16)
    grid = torch.tensor([[2, 16, 18]])
    pv = pixels(grid.tolist()).to(torch.bfloat16)
    calls = []
    original = cpu_ops.bias_quick_gelu_
    monkeypatch.setattr(cpu_ops, "bias_quick_gelu_", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        fused = model.model.visual(pv, grid).float()
    monkeypatch.setattr(cpu_ops, "bias_quick_gelu_", lambda *a: False)
    with torch.no_grad():
        plain = model.model.visual(pv, grid).float()
    assert calls or cpu.library() is None
    assert (fused - plain).abs().max().item() <= 0.05 * plain.abs().max().item()


def test_torch_varlen_adapter_follows_each_signature():
    """flash_attention_2 without the flash-attn package runs PyTorch's varlen_attn, whose keywords changed across
    releases (is_causal / window_size, scale, enable_gqa): the adapter passes each form the same meaning."""
    from qwen2vl.model.attention import _torch_varlen_adapter

    calls = []

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(("old", key.shape[1], is_causal, query.clone()))

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        calls.append(("new", key.shape[1], window_size, scale, enable_gqa))

    q, k = torch.ones(5, 4, 16), torch.ones(5, 2, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    _torch_varlen_adapter(old)(q, k, k, cu, cu, 5, 5, softmax_scale=0.5, causal=True)
    _torch_varlen_adapter(new)(q, k, k, cu, cu, 5, 5, softmax_scale=0.5, causal=True)
    _torch_varlen_adapter(new)(q, q, q, cu, cu, 5, 5, softmax_scale=0.25, causal=False)
    kind, heads, causal, q_seen = calls[0]
    assert (kind, heads, causal) == ("old", 4, True)           # K/V repeated to the query heads
    assert torch.allclose(q_seen, torch.full_like(q, 0.5 * 4))  # scale folded into q (default 1/sqrt(16))
    assert calls[1] == ("new", 2, (-1, 0), 0.5, True)
    assert calls[2] == ("new", 4, (-1, -1), 0.25, False)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_vision_tower_and_prefill_on_cpus_without_bf16_matmuls(monkeypatch, native):
    """Where the CPU has no native bf16 matmul, many-row bf16 linears (vision tower, prefill) and the vision
    attention run in fp32 on widened operands, rounded once to bf16 — a bf16 matmul's own arithmetic, so the
    bf16 tower and the bf16 prefill logits match transformers' bf16 (same weights) as closely as the native path
    does (both within bf16 rounding of the fp32 oracle: 3 % of the largest value)."""
    from qwen2vl.kernels import cpu

    monkeypatch.setattr(cpu, "has_native_bf16_matmul", lambda: native)
    widened = []
    original = cpu.widened_linear
    monkeypatch.setattr(cpu, "widened_linear", lambda *a: widened.append(1) or original(*a))
    model = tiny_model(mrope_section=(4, 2, 2))
    hf = oracle_from(model)  # fp32 oracle
    model = model.to(torch.bfloat16)
    grid = torch.tensor([[2, 16, 18]])
    pv = pixels(grid.tolist())
    ids = torch.randint(5, 90, (1, 40))
    with torch.no_grad():
        tower = model.model.visual(pv.bfloat16(), grid).float()
        ref_tower = hf.model.visual(pv, grid_thw=grid).pooler_output
        logits = model(input_ids=ids).logits.float()
        ref_logits = hf(input_ids=ids).logits
    assert (tower - ref_tower).abs().max().item() <= 0.03 * ref_tower.abs().max().item()
    assert (logits - ref_logits).abs().max().item() <= 0.03 * ref_logits.abs().max().item()
    x = torch.randn(80, 64).bfloat16()
    w, b = torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    got = cpu.widened_linear(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())

    def rounded_once(y, ref):  # exact bf16 products, fp32 sums (in some order), one rounding
        return y.dtype == torch.bfloat16 and ((y.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()

    if native:
        assert got is None
    else:  # what torch's bf16 matmul computes, to fp32 sum order
        assert rounded_once(got, ref)
        monkeypatch.setattr(cpu, "WIDEN_TILE", 20 * 64)  # the weight widened 20 rows at a time: three tiles
        assert rounded_once(cpu.widened_linear(x, w, b), ref)
        assert cpu.widened_linear(x[:40], w, b) is None  # fewer rows: the GEMV kernel in 8-row chunks / torch
        if cpu.has_bf16_gemv():
            assert cpu._chunked_gemv(x[:40], w, b) is not None and rounded_once(cpu.linear(x[:40], w, b), ref[:40])
        assert len(widened) > 0
