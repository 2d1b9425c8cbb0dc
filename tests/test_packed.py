"""Packed ("padding-free") rows: several samples end to end in one row, positions restarting at 0.

Each sample's logits in a packed row must equal the sample run alone (<= 1e-4), for 1-D, M-RoPE 3-row and
transformers' 4-row position_ids and for cu_seq_lens; and equal the reference's packed forward (which supports
the 4-row form without a cache). Where packing cannot be honoured (continuing a KV cache) it raises.
"""
import pytest
import torch

from qwen2vl.model import attention
from qwen2vl.model.packing import packed_segments, packed_varlen
from tiny import IMG, mm_token_type_ids, oracle_from, pixels, sample, tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_model(merge_size=2, mrope_section=(4, 2, 2))


def _samples():
    """Three samples: text, text + one image, text; with their own ids, pixels and M-RoPE positions."""
    grid = torch.tensor([[1, 4, 4]])
    items = [(torch.tensor([sample(5, [], 0, 2, seed=1)]), None),
             (torch.tensor([sample(3, [("image", [1, 4, 4])], 2, 2, seed=2)]), grid),
             (torch.tensor([sample(4, [], 0, 2, seed=3)]), None)]
    return items, pixels(grid.tolist(), seed=4)


def _alone(model, items, pix):
    with torch.no_grad():
        outs = [model(input_ids=ids, use_cache=False,
                      **({} if g is None else dict(pixel_values=pix, image_grid_thw=g))).logits
                for ids, g in items]
    return torch.cat(outs, 1)


def _packed_inputs(model, items, pix):
    ids = torch.cat([i for i, _ in items], 1)
    pos3 = torch.cat([model.get_rope_index(i, g)[0] for i, g in items], -1)             # (3,1,S)
    text = torch.cat([torch.arange(i.shape[1]) for i, _ in items])[None, None]          # (1,1,S)
    return ids, pos3, torch.cat([text, pos3], 0), dict(pixel_values=pix, image_grid_thw=items[1][1])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_equals_samples_alone(model, impl):
    model.set_attn_implementation(impl)
    try:
        items, pix = _samples()
        alone = _alone(model, items, pix)
        ids, pos3, pos4, vis = _packed_inputs(model, items, pix)
        lens = [i.shape[1] for i, _ in items]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        with torch.no_grad():
            for kw in (dict(position_ids=pos3), dict(position_ids=pos4),
                       dict(position_ids=pos3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)):
                for use_cache in (False, True):  # an empty cache being filled is fine
                    out = model(input_ids=ids, use_cache=use_cache, **kw, **vis).logits
                    assert (out - alone).abs().max().item() <= ATOL, (kw.keys(), use_cache)
    finally:
        model.set_attn_implementation("sdpa")


def test_text_only_1d_positions_and_batch_of_packed_rows(model):
    items = [(torch.tensor([sample(n, [], 0, 2, seed=n)]), None) for n in (4, 6, 5, 5)]
    alone = _alone(model, items, None)
    ids = torch.cat([i for i, _ in items], 1).view(2, 10)
    pos = torch.tensor([list(range(4)) + list(range(6)), list(range(5)) * 2])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos).logits
    assert (out.reshape(1, 20, -1) - alone).abs().max().item() <= ATOL


def test_packed_row_matches_reference_packed_forward(model):
    """The reference packs only the 4-row form without attention_mask and without a cache."""
    items, pix = _samples()
    ids, _, pos4, vis = _packed_inputs(model, items, pix)
    hf = oracle_from(model, attn="sdpa")
    with torch.no_grad():
        ours = model(input_ids=ids, position_ids=pos4, use_cache=False, **vis).logits
        ref = hf(input_ids=ids, position_ids=pos4, use_cache=False, mm_token_type_ids=mm_token_type_ids(ids),
                 **vis).logits
    assert (ours - ref).abs().max().item() <= ATOL


def test_packed_loss_and_gradients_flow(model):
    items, pix = _samples()
    ids, pos3, _, vis = _packed_inputs(model, items, pix)
    labels = ids.masked_fill(ids == IMG, -100)
    model.train()
    try:
        loss = model(input_ids=ids, position_ids=pos3, labels=labels, **vis).loss
        loss.backward()
        assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_cache_cannot_continue_packed_rows(model):
    ids = torch.randint(7, 90, (1, 8))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=True)
        with pytest.raises(ValueError, match="Packed sequences"):
            model(input_ids=ids[:, :1], past_key_values=out.past_key_values)
        plain = model(input_ids=ids[:, :4], use_cache=True)
        with pytest.raises(ValueError, match="Packed sequences"):  # a packed chunk on top of past tokens
            model(input_ids=ids, position_ids=pos + 4 * (pos > 0), past_key_values=plain.past_key_values,
                  cu_seq_lens=torch.tensor([0, 4, 8]))


def test_bad_cu_seq_lens_raise(model):
    ids = torch.randint(7, 90, (1, 8))
    with pytest.raises(ValueError, match="cu_seq_lens"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 4, 7]))


def test_left_padding_is_not_taken_for_packing():
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])[None].expand(3, -1, -1)
    assert packed_segments(pos, valid) is None
    pos = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 1, 2]])[None].expand(3, -1, -1)
    assert packed_segments(pos, valid).tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]


def test_flash_varlen_layout_runs_each_sample_alone(monkeypatch):
    """The CUDA flash path cannot run here: check its packed layout by driving `flash_text_attention` with a
    CPU stand-in for flash_attn_varlen_func (causal attention within each cu range)."""
    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        assert torch.equal(cu_q, cu_k) and max_q == int((cu_q[1:] - cu_q[:-1]).max())
        out = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            out.append(attention.sdpa_attention(qs, ks, vs, None, softmax_scale)[0].transpose(0, 1))
        return torch.cat(out)

    monkeypatch.setattr(attention, "_flash_varlen", lambda: fake_varlen)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    valid = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    pos = torch.tensor([[0, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3]])[None].expand(3, -1, -1)
    seg = packed_segments(pos, valid)
    varlen = packed_varlen(seg, valid)
    assert varlen.cu_q.tolist() == [0, 3, 5, 7, 11]
    out = attention.flash_text_attention(q, k, v, 0.35, varlen)
    for row, spans in ((0, [(1, 4), (4, 6)]), (1, [(0, 2), (2, 6)])):
        for a, b in spans:
            ref = attention.sdpa_attention(q[row:row + 1, :, a:b], k[row:row + 1, :, a:b], v[row:row + 1, :, a:b],
                                           None, 0.35)
            assert torch.allclose(out[row:row + 1, :, a:b], ref, atol=1e-6)
    assert out[0, :, 0].abs().max() == 0  # the pad query
