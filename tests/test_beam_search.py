"""generate() options beyond greedy/sampling, against transformers 5.24 on a tiny model: beam search (sequences,
scores, beam indices), bad_words_ids, remove_invalid_values, output_hidden_states / output_attentions in
return_dict_in_generate, forward(output_hidden_states / output_attentions / return_dict); and one clear error
for what stays unsupported."""
import pytest
import torch

from tiny import left_pad, oracle_from, tiny_model


@pytest.fixture(scope="module")
def pair():
    model = tiny_model(attn="eager")
    return model, oracle_from(model, attn="eager")


@pytest.fixture(scope="module")
def prompt():
    return left_pad([[7, 8, 9, 10, 11], [12, 13, 14]])


def _eos_that_fires(model, ids, mask, **kw):
    """Token ids the model actually produces at the second step (so hypotheses finish at different lengths)."""
    out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=98, **kw)
    return sorted(set(out[:, ids.shape[1] + 1].tolist()))


@pytest.mark.parametrize("beams,length_penalty,early_stopping,n", [
    (2, 1.0, False, 1), (3, 1.0, True, 2), (4, 0.5, "never", 3), (3, -1.0, False, 3)],
    ids=["2beams", "early_stop", "never", "short_pref"])
def test_beam_search_equals_reference(pair, prompt, beams, length_penalty, early_stopping, n):
    ours, hf = pair
    ids, mask = prompt
    opts = dict(num_beams=beams, length_penalty=length_penalty, early_stopping=early_stopping,
                num_return_sequences=n, max_new_tokens=7)
    for eos in (98, _eos_that_fires(ours, ids, mask, **opts)):
        kw = dict(input_ids=ids, attention_mask=mask, eos_token_id=eos, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, **opts)
        o, r = ours.generate(**kw), hf.generate(**kw)
        assert o.sequences.shape == r.sequences.shape and torch.equal(o.sequences, r.sequences), eos
        assert torch.allclose(o.sequences_scores, r.sequences_scores, atol=1e-4)
        assert torch.equal(o.beam_indices, r.beam_indices.long())
        assert len(o.scores) == len(r.scores)


def test_bad_words_and_remove_invalid_values_equal_reference(pair, prompt):
    ours, hf = pair
    ids, mask = prompt
    plain = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    first, second = int(plain[0, 5]), int(plain[0, 6])
    bad = [[first], [second + 0, int(plain[1, 6])], [int(plain[1, 5]), int(plain[1, 6])]]
    for beams in (1, 3):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, bad_words_ids=bad, num_beams=beams,
                  remove_invalid_values=True, eos_token_id=98)
        o, r = ours.generate(**kw), hf.generate(**kw)
        assert torch.equal(o, r)
        assert not (o[:, 5:] == first).any()
    assert not torch.equal(o, plain)


def test_hidden_states_and_attentions_in_generate(pair, prompt):
    ours, hf = pair
    ids, mask = prompt
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, eos_token_id=98, return_dict_in_generate=True,
              output_hidden_states=True, output_attentions=True)
    o, r = ours.generate(**kw), hf.generate(**kw)
    assert torch.equal(o.sequences, r.sequences)
    assert len(o.hidden_states) == len(r.hidden_states) == 3
    for step_o, step_r in zip(o.hidden_states, r.hidden_states):
        assert len(step_o) == len(step_r)
        for a, b in zip(step_o, step_r):
            assert a.shape == b.shape
            real = mask.bool() if a.shape[1] == ids.shape[1] else torch.ones(2, 1, dtype=torch.bool)
            assert (a - b)[real].abs().max() <= 1e-4
    assert [t.shape for t in o.attentions[1]] == [t.shape for t in r.attentions[1]]


def test_forward_hidden_states_attentions_and_tuples(pair, prompt):
    ours, hf = pair
    ids, mask = prompt
    with torch.no_grad():
        o = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True,
                 use_cache=False)
        r = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        assert len(o.hidden_states) == len(r.hidden_states) == ours.config.text_config.num_hidden_layers + 1
        for a, b in zip(o.hidden_states, r.hidden_states):
            assert (a - b)[mask.bool()].abs().max() <= 1e-4
        for a, b in zip(o.attentions, r.attentions):  # real query rows (pad rows are arbitrary on both sides)
            assert a.shape == b.shape and (a - b).transpose(1, 2)[mask.bool()].abs().max() <= 1e-4
        t = ours(input_ids=ids, attention_mask=mask, return_dict=False, use_cache=False)
        assert isinstance(t, tuple) and torch.equal(t[0], o.logits)
        base = ours.model(input_ids=ids, attention_mask=mask, return_dict=False, use_cache=False)
        assert isinstance(base, tuple) and torch.allclose(base[0], o.hidden_states[-1])


def test_unsupported_combinations_name_the_argument(prompt):
    model = tiny_model()
    ids, mask = prompt
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(ValueError, match="do_sample is not supported together with beam search"):
        model.generate(input_ids=ids, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(input_ids=ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate(input_ids=ids, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="bad_words_ids"):
        model.generate(input_ids=ids, bad_words_ids=[[]])
