"""Parity with the transformers oracle on a model where positions matter: the real checkpoints' head shapes (text
head 128, mrope_section [16, 24, 24]; vision head 80) and weights redrawn with std 0.1, so attention is far from
uniform. Swapping the h/w axes of the text M-RoPE or of the vision rotary moves these logits by 5-50 % of their
scale; the default tiny init (std 0.02) moved them by 0.1 %, under any sane tolerance.

Tolerance, relative to the logit scale: max |ours - reference| <= 1e-4 * max |reference| (fp32; measured
~2e-6). Videos whose temporal patches exceed max(h, w)/merge follow our deliberate position rule for the text
AFTER them (README, "Deliberate deviation"), so those prompts are compared only up to the last video token.
"""
import pytest
import torch

from tiny import IMG, VE, VID, left_pad, media, mm_token_type_ids, oracle_from, pixels, real_heads_model, sample

REL = 1e-4
MERGE = 2
CASES = {
    "one_image": [("image", [1, 4, 6])],
    "two_images": [("image", [1, 4, 4]), ("image", [1, 6, 2])],
    "video": [("video", [2, 4, 6])],                      # t=2 <= max(h,w)/merge: text after it compares too
    "image_and_video": [("image", [1, 2, 4]), ("video", [2, 6, 2])],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pair():
    model = real_heads_model()
    return model, oracle_from(model, attn="eager")


def both(pair, ids, mask=None, **kw):
    model, hf = pair
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        ref = hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids), **kw).logits
    return ours, ref


def assert_close(ours, ref):
    scale = ref.abs().max().item()
    assert scale > 1.0  # logits with a real spread (the default init gives ~1)
    assert (ours - ref).abs().max().item() <= REL * scale


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_oracle(pair, case):
    ids = torch.tensor([sample(4, CASES[case], 5, MERGE, seed=3)])
    assert_close(*both(pair, ids, **media(CASES[case], seed=3)))


def test_long_video_matches_up_to_its_last_token(pair):
    """t=6 temporal patches > max(h,w)/merge=3: compared through the video block (the text after it is where our
    position rule deliberately differs)."""
    items = [("video", [6, 4, 6])]
    ids = torch.tensor([sample(5, items, 4, MERGE, seed=4)])
    ours, ref = both(pair, ids, **media(items, seed=4))
    end = int((ids[0] == VE).nonzero()[0])
    assert (ids[0, end - 1] == VID) and end > 30
    assert_close(ours[:, :end], ref[:, :end])


def test_left_padded_batch_matches_oracle(pair):
    names = ["two_images", "one_image", "video"]
    seqs = [sample(2, CASES[n], 2 + 3 * i, MERGE, seed=10 + i) for i, n in enumerate(names)]
    seqs.insert(1, sample(9, [], 3, MERGE, seed=20))  # a text-only row between them
    ids, mask = left_pad(seqs)
    img = [g for n in names for k, g in CASES[n] if k == "image"]
    vid = [g for n in names for k, g in CASES[n] if k == "video"]
    kw = dict(pixel_values=pixels(img, seed=5), image_grid_thw=torch.tensor(img),
              pixel_values_videos=pixels(vid, seed=6), video_grid_thw=torch.tensor(vid))
    ours, ref = both(pair, ids, mask, **kw)
    real = mask.bool()
    assert (mask == 0).any() and ((ids == IMG) | (ids == VID)).any()
    assert_close(ours[real], ref[real])


@pytest.mark.parametrize("grid", [[[1, 2, 2]], [[1, 4, 6]], [[2, 6, 4]], [[1, 4, 4], [2, 2, 6], [1, 8, 2]],
                                  [[1, 16, 18]]], ids=["2x2", "4x6", "video_6x4", "three_items", "16x18"])
def test_vision_tower_matches_oracle(pair, grid, monkeypatch):
    """The tower alone, several grids (non-square, video, several items per call); 16x18 = 288 patches runs the
    fused rotary + attention CPU kernel where the build has it (head 80), the smaller ones SDPA."""
    from qwen2vl.kernels import cpu_ops

    model, hf = pair
    calls = []
    original = cpu_ops.vision_attention
    monkeypatch.setattr(cpu_ops, "vision_attention", lambda *a: calls.append(1) or original(*a))
    g = torch.tensor(grid)
    pv = pixels(grid, seed=7)
    with torch.no_grad():
        ours = model.model.visual(pv, g)
        ref = hf.model.visual(pv, grid_thw=g).pooler_output
    assert (ours - ref).abs().max().item() <= REL * ref.abs().max().item()
    assert bool(calls) == (sum(t * h * w for t, h, w in grid) >= 256)
