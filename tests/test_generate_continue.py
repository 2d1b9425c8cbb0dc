"""`generate(..., past_key_values=out.past_key_values)`: a conversation continued from the returned cache equals
generating from the whole conversation from scratch (also with a new picture in the new turn), and only the new
part is prefilled."""
from __future__ import annotations

import pytest
import torch

from test_engine import scaled
from tiny import IMG, VE, VS, pixels, tiny_model

GRID = [1, 4, 4]


@pytest.fixture(scope="module")
def model():
    return scaled(tiny_model(seed=5))


def image_block():
    return [VS] + [IMG] * 4 + [VE]


def gen(model, ids, px, grids, **kw):
    return model.generate(input_ids=torch.tensor([ids]), pixel_values=px, image_grid_thw=torch.tensor(grids),
                          max_new_tokens=6, eos_token_id=[], do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **kw)


def test_continuing_from_the_returned_cache_equals_starting_over(model):
    turn1 = list(range(10, 20)) + image_block() + [40, 41, 42]
    px1 = pixels([GRID], seed=1)
    out1 = gen(model, turn1, px1, [GRID])
    cache = out1.past_key_values
    assert cache.get_seq_length() == len(turn1) + 6 - 1
    # the next turn: the previous sequence, new text and a second picture
    turn2 = out1.sequences[0].tolist() + [50, 51] + image_block() + [52, 53]
    px = torch.cat([px1, pixels([GRID], seed=2)])
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None
                                       else kw["input_ids"]).shape[1]), with_kwargs=True)
    try:
        cont = gen(model, turn2, px, [GRID, GRID], past_key_values=cache)
    finally:
        hook.remove()
    fresh = gen(model, turn2, px, [GRID, GRID])
    assert calls[0] == len(turn2) - (len(turn1) + 5)   # only the uncached part was prefilled
    assert cont.sequences.tolist() == fresh.sequences.tolist()
    for a, b in zip(cont.logits, fresh.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_continuation_errors_are_clear(model):
    turn1 = list(range(10, 20))
    out1 = model.generate(input_ids=torch.tensor([turn1]), max_new_tokens=3, eos_token_id=[], do_sample=False,
                          return_dict_in_generate=True)
    with pytest.raises(ValueError, match="must extend"):
        model.generate(input_ids=torch.tensor([turn1[:5]]), past_key_values=out1.past_key_values, max_new_tokens=2)
    with pytest.raises(ValueError, match="one conversation at a time"):
        model.generate(input_ids=torch.tensor([turn1 + [1, 2, 3]] * 2), past_key_values=out1.past_key_values,
                       max_new_tokens=2)
    with pytest.raises(ValueError, match="past_key_values must be the KVCache"):
        model.generate(input_ids=torch.tensor([turn1]), past_key_values=[(1, 2)], max_new_tokens=2)
