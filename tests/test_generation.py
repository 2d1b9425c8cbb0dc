"""generate(): parity with the transformers oracle (greedy, fp32, tiny random models), batching, sampling,
stopping, options and input validation.

The tiny model's weights are redrawn with std 0.2 so greedy outputs are diverse (std 0.02 repeats one token),
which makes token-level parity meaningful. EOS is an id outside the vocab unless a test is about EOS.
"""
import importlib
import threading

import pytest
import torch

from tiny import IMG, PAD, left_pad, media, mm_token_type_ids, oracle_from, pixels, sample, spread, tiny_model

from qwen2vl.generation import GenerationConfig, TextIteratorStreamer
from qwen2vl.generation.stopping import FinishedFlags
from qwen2vl.generation.logits import min_p_filter, top_k_filter, top_p_filter
from paths import QWEN2VL_2B

generate_module = importlib.import_module("qwen2vl.generation.generate")  # the package attr is the function
MERGE = 2
NEW = 32
NO_EOS = 1000  # never produced by a 99-token vocab
CASES = {
    "text": [],
    "one_image": [("image", [1, 4, 6])],
    "two_images": [("image", [1, 4, 4]), ("image", [1, 2, 6])],
    "video": [("video", [2, 4, 4])],          # t=2 <= max(h,w)/merge: same positions as transformers 5.x
    "image_and_video": [("image", [1, 2, 4]), ("video", [2, 2, 4])],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return spread(tiny_model(seed=0, merge_size=MERGE, mrope_section=(4, 2, 2), tie=False), 0.2)


@pytest.fixture(scope="module")
def oracle(model):
    return oracle_from(model, attn="eager")


def single(case, seed=0):
    items = CASES[case]
    return torch.tensor([sample(3, items, 4, MERGE, seed=seed)]), media(items, seed)


def batch_of(cases):
    """Left-padded batch of CASES (seed = position) with the media concatenated in batch order."""
    seqs = [sample(3, CASES[c], 4, MERGE, seed=i) for i, c in enumerate(cases)]
    ids, mask = left_pad(seqs)
    pv, ig, pvv, vg = [], [], [], []
    for i, c in enumerate(cases):
        kw = media(CASES[c], seed=i)
        for key, dst in (("pixel_values", pv), ("image_grid_thw", ig), ("pixel_values_videos", pvv),
                         ("video_grid_thw", vg)):
            if key in kw:
                dst.append(kw[key])
    kw = {}
    for key, parts in (("pixel_values", pv), ("image_grid_thw", ig), ("pixel_values_videos", pvv),
                       ("video_grid_thw", vg)):
        if parts:
            kw[key] = torch.cat(parts)
    return ids, mask, kw


def ours(model, ids, mask=None, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("eos_token_id", NO_EOS)
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def theirs(oracle, ids, mask=None, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("eos_token_id", NO_EOS)
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return oracle.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                               do_sample=False, pad_token_id=PAD, **kw)


_alone_cache = {}


def alone(model, case, seed):
    key = (case, seed)
    if key not in _alone_cache:
        ids = torch.tensor([sample(3, CASES[case], 4, MERGE, seed=seed)])
        _alone_cache[key] = ours(model, ids, **media(CASES[case], seed))[0, ids.shape[1]:]
    return _alone_cache[key]


# --------------------------------------------------------------------------------------------- oracle parity
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_oracle(model, oracle, case):
    ids, kw = single(case)
    out = ours(model, ids, **kw)
    ref = theirs(oracle, ids, **kw)
    assert out.shape == (1, ids.shape[1] + NEW)
    assert torch.equal(out, ref), (out[0, ids.shape[1]:].tolist(), ref[0, ids.shape[1]:].tolist())
    assert len(set(out[0, ids.shape[1]:].tolist())) > 3  # a meaningful (non-constant) continuation


def test_left_padded_mixed_batch_matches_oracle_and_each_sample_alone(model, oracle):
    cases = ["one_image", "text", "two_images", "video"]
    ids, mask, kw = batch_of(cases)
    out = ours(model, ids, mask, **kw)
    ref = theirs(oracle, ids, mask, **kw)
    assert torch.equal(out, ref)
    s = ids.shape[1]
    for i, c in enumerate(cases):
        assert torch.equal(out[i, s:], alone(model, c, i)), c


def test_repetition_penalty_matches_oracle(model, oracle):
    ids, mask, kw = batch_of(["one_image", "text"])
    out = ours(model, ids, mask, repetition_penalty=1.5, **kw)
    ref = theirs(oracle, ids, mask, repetition_penalty=1.5, **kw)
    assert torch.equal(out, ref)
    assert not torch.equal(out, ours(model, ids, mask, **kw))  # the penalty changed something


def test_eos_padding_and_min_new_tokens_match_oracle(model, oracle):
    ids, mask, kw = batch_of(["two_images", "text"])
    s = ids.shape[1]
    free = ours(model, ids, mask, **kw)
    eos = int(free[1, s + 2])                      # row 1 emits it at step 2 (maybe row 0 too, later)
    out = ours(model, ids, mask, eos_token_id=[eos, NO_EOS], **kw)
    ref = theirs(oracle, ids, mask, eos_token_id=[eos, NO_EOS], **kw)
    assert torch.equal(out, ref)
    assert out.shape[1] < s + NEW or (out[1, s + 3:] == PAD).all()
    out = ours(model, ids, mask, eos_token_id=eos, min_new_tokens=6, **kw)
    ref = theirs(oracle, ids, mask, eos_token_id=eos, min_new_tokens=6, **kw)
    assert torch.equal(out, ref)
    assert eos not in out[:, s:s + 6].tolist()


def test_scores_and_logits_match_oracle(model, oracle):
    ids, kw = single("one_image")
    out = ours(model, ids, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
               output_logits=True, repetition_penalty=1.2, **kw)
    ref = theirs(oracle, ids, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
                 output_logits=True, repetition_penalty=1.2, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(out.logits) == 6 and out.scores[0].shape == (1, 99)
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_warpers_match_oracle():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for mine, ref in ((top_k_filter(scores, 7), TopKLogitsWarper(7)(ids, scores)),
                      (top_p_filter(scores, 0.8), TopPLogitsWarper(0.8)(ids, scores)),
                      (top_p_filter(scores, 0.001), TopPLogitsWarper(0.001)(ids, scores)),
                      (min_p_filter(scores, 0.1), MinPLogitsWarper(0.1)(ids, scores))):
        assert torch.equal(mine, ref)


def test_vision_once_and_logits_only_for_the_last_position(model):
    ids, kw = single("image_and_video")
    vision, heads = [], []
    hooks = [model.model.visual.register_forward_hook(lambda *a: vision.append(1)),
             model.lm_head.register_forward_hook(lambda mod, args, out: heads.append(tuple(out.shape)))]
    try:
        ours(model, ids, max_new_tokens=8, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert len(vision) == 2                          # one call for the images, one for the videos
    assert heads[0] == (1, 1, 99) and len(heads) == 8 and all(h == (1, 99) for h in heads[1:])


# --------------------------------------------------------------------------------------------- batching
def test_finished_rows_leave_the_running_batch(model):
    cases = ["text", "one_image", "video"]
    ids, mask, kw = batch_of(cases)
    s = ids.shape[1]
    eos = int(alone(model, "text", 0)[1])           # the text row stops after at most 2 tokens
    sizes = []
    hook = model.model.language_model.register_forward_hook(
        lambda mod, args, out: sizes.append(out.last_hidden_state.shape[0]))
    try:
        out = ours(model, ids, mask, eos_token_id=eos, **kw)
    finally:
        hook.remove()
    assert sizes[0] == 3 and min(sizes) < 3 and len(sizes) == out.shape[1] - s
    for i, c in enumerate(cases):
        one = torch.tensor([sample(3, CASES[c], 4, MERGE, seed=i)])
        ref = ours(model, one, eos_token_id=eos, **media(CASES[c], i))[0, one.shape[1]:].tolist()
        n = len(ref) if eos not in ref else ref.index(eos) + 1
        assert out[i, s:s + n].tolist() == ref[:n] and (out[i, s + n:] == PAD).all(), c


class LaggingFlags(FinishedFlags):
    """The CUDA read-back of the finished flags, simulated on CPU: flags arrive two polls after `submit`."""

    def __init__(self, device, eager, batch_size):
        super().__init__(torch.device("cpu"), eager, batch_size)
        self.async_mode, self.host, self.waits = not eager, torch.empty(batch_size, dtype=torch.bool), 0

    def submit(self, finished):
        if self.async_mode and self.pending is None:
            self.host[:finished.shape[0]].copy_(finished)
            self.pending, self.waits = (finished.shape[0], None), 2

    def ready(self):
        self.waits -= 1
        return self.waits <= 0


def test_late_finished_flags_give_the_same_tokens(model, monkeypatch):
    cases = ["text", "one_image", "two_images"]
    ids, mask, kw = batch_of(cases)
    eos = int(alone(model, "text", 0)[1])
    expected = ours(model, ids, mask, eos_token_id=eos, **kw)
    monkeypatch.setattr(generate_module, "FinishedFlags", LaggingFlags)
    sizes = []
    hook = model.model.language_model.register_forward_hook(
        lambda mod, args, out: sizes.append(out.last_hidden_state.shape[0]))
    try:
        out = ours(model, ids, mask, eos_token_id=eos, **kw)
    finally:
        hook.remove()
    assert torch.equal(out, expected)
    assert min(sizes) < 3                           # rows are still dropped, a little later


def test_num_return_sequences_greedy_duplicates_in_order(model):
    ids, mask, kw = batch_of(["one_image", "two_images"])
    out = ours(model, ids, mask, num_return_sequences=2, **kw)
    s = ids.shape[1]
    assert out.shape == (4, s + NEW)
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])
    assert torch.equal(out[0, s:], alone(model, "one_image", 0))
    assert torch.equal(out[2, s:], alone(model, "two_images", 1))


def test_num_return_sequences_sampling_is_seeded(model):
    ids, kw = single("one_image")
    a = ours(model, ids, do_sample=True, temperature=1.5, top_k=0, num_return_sequences=3, seed=7,
             max_new_tokens=12, **kw)
    b = ours(model, ids, do_sample=True, temperature=1.5, top_k=0, num_return_sequences=3, seed=7,
             max_new_tokens=12, **kw)
    assert a.shape == (3, ids.shape[1] + 12) and torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1   # the samples differ from each other


def test_seeded_sampling_reproducible(model):
    ids, mask, kw = batch_of(["text", "one_image"])
    opts = dict(do_sample=True, temperature=1.2, top_p=0.9, top_k=20, max_new_tokens=16)
    a = ours(model, ids, mask, seed=123, **opts, **kw)
    b = ours(model, ids, mask, generator=torch.Generator().manual_seed(123), **opts, **kw)
    c = ours(model, ids, mask, seed=124, **opts, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k=1 sampling (the shipped Qwen2-VL configs) is greedy.
    greedy = ours(model, ids, mask, **kw)
    assert torch.equal(ours(model, ids, mask, do_sample=True, top_k=1, temperature=0.01, top_p=0.001,
                            seed=5, **kw), greedy)


# --------------------------------------------------------------------------------------------- stopping
def _tokenizer():
    from test_streamers import load_tokenizer

    return load_tokenizer()


def test_stop_strings(model):
    tok = _tokenizer()
    ids, kw = single("one_image")
    s = ids.shape[1]
    free = ours(model, ids, **kw)[0, s:].tolist()
    text = tok.decode(free, skip_special_tokens=False)
    pieces = [tok.decode(free[:i + 1], skip_special_tokens=False) for i in range(len(free))]
    stop = text[len(pieces[4]) - 1:len(pieces[6]) - 1]   # ends inside token 6, starts in token 4
    k = next(i for i, p in enumerate(pieces) if stop in p)
    out = ours(model, ids, stop_strings=stop, tokenizer=tok, **kw)
    assert out[0, s:].tolist() == free[:k + 1]           # stops at the completing token, which is kept
    assert stop in tok.decode(out[0, s:].tolist(), skip_special_tokens=False)
    out = ours(model, ids, stop_strings=["not there", stop], tokenizer=tok, **kw)
    assert out.shape[1] == s + k + 1


def test_stop_strings_stop_only_their_row(model):
    tok = _tokenizer()
    cases = ["one_image", "text"]
    ids, mask, kw = batch_of(cases)
    s = ids.shape[1]
    free = [alone(model, c, i).tolist() for i, c in enumerate(cases)]
    stop = tok.decode(free[0][5:8])
    out = ours(model, ids, mask, stop_strings=[stop], tokenizer=tok, **kw)
    for i in range(2):
        prompt = ids[i][mask[i].bool()].tolist()
        before = tok.decode(prompt).count(stop)
        k = next((j for j in range(NEW) if tok.decode(prompt + free[i][:j + 1]).count(stop) > before), NEW - 1)
        assert out[i, s:s + k + 1].tolist() == free[i][:k + 1] and (out[i, s + k + 1:] == PAD).all()
    assert out.shape[1] < s + NEW or (out[0, -1] == PAD)


def test_streaming_through_generate(model):
    tok = _tokenizer()
    ids, kw = single("text")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", ours(model, ids, streamer=streamer, **kw)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == tok.decode(result["out"][0, ids.shape[1]:].tolist())
    assert len(pieces) > 1


# --------------------------------------------------------------------------------------------- options
def test_generation_config_priority_and_defaults(model, tmp_path):
    ids, kw = single("text")
    greedy = ours(model, ids, **kw)
    assert ours(model, ids, max_new_tokens=None, **kw).shape[1] == ids.shape[1] + 20   # transformers' default
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.01, top_k=1, top_p=0.001,
                                               eos_token_id=[NO_EOS, NO_EOS + 1], max_new_tokens=5)
    try:
        out = model.generate(input_ids=ids, **kw)
        assert torch.equal(out, greedy[:, :ids.shape[1] + 5])
        cfg = GenerationConfig(max_new_tokens=7)
        assert model.generate(input_ids=ids, generation_config=cfg, **kw).shape[1] == ids.shape[1] + 7
        assert model.generate(input_ids=ids, generation_config=cfg, max_new_tokens=3, **kw).shape[1] == \
            ids.shape[1] + 3
    finally:
        del model.generation_config
    cfg = GenerationConfig.from_model_dir(QWEN2VL_2B)
    assert cfg.eos_token_ids == [151645, 151643] and cfg.pad_token_id == 151643 and cfg.top_k == 1
    assert cfg.do_sample is True and cfg.extra["transformers_version"] == "4.37.0"
    cfg.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path) == cfg
    fallback = GenerationConfig.from_model_dir(tmp_path / "missing", model.config)
    assert fallback.eos_token_id == 2 and fallback.pad_token_id == PAD and fallback.do_sample is None


def test_max_new_tokens_zero_returns_prompt(model):
    ids, kw = single("one_image")
    assert torch.equal(ours(model, ids, max_new_tokens=0, **kw), ids)


# --------------------------------------------------------------------------------------------- bad inputs
def _bad_cases():
    ids, kw = single("one_image")
    two_ids, two_mask, two_kw = batch_of(["text", "one_image"])
    fewer = ids.clone()
    fewer[0, (ids[0] == IMG).nonzero()[0, 0]] = 50
    right_mask = two_mask.flip(-1)
    return {
        "negative max_new_tokens": (dict(input_ids=ids, max_new_tokens=-1, **kw), "max_new_tokens"),
        "too long": (dict(input_ids=ids, max_new_tokens=600, **kw), "max_position_embeddings"),
        "pixels without grid": (dict(input_ids=ids, pixel_values=kw["pixel_values"]), "image_grid_thw"),
        "grid without pixels": (dict(input_ids=ids, image_grid_thw=kw["image_grid_thw"]), "pixel_values"),
        "placeholder count": (dict(input_ids=fewer, **kw), "<|image_pad|>"),
        "pixel rows": (dict(input_ids=ids, pixel_values=kw["pixel_values"][:-4],
                            image_grid_thw=kw["image_grid_thw"]), "pixel_values"),
        "right padding": (dict(input_ids=two_ids, attention_mask=right_mask, **two_kw), "padding_side='left'"),
        "temperature 0": (dict(input_ids=ids, do_sample=True, temperature=0.0, **kw), "temperature"),
        "top_p 0": (dict(input_ids=ids, do_sample=True, top_p=0.0, **kw), "top_p"),
        "top_p > 1": (dict(input_ids=ids, do_sample=True, top_p=1.5, **kw), "top_p"),
        "min_p": (dict(input_ids=ids, do_sample=True, min_p=2.0, **kw), "min_p"),
        "stop strings without tokenizer": (dict(input_ids=ids, stop_strings="x", **kw), "tokenizer"),
        "stream a batch": (dict(input_ids=two_ids, attention_mask=two_mask, streamer=object(), **two_kw),
                           "single sequence"),
        "1-D ids": (dict(input_ids=ids[0], **kw), "input_ids"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_inputs_raise_before_compute(model, name):
    kwargs, match = _bad_cases()[name]
    calls = []
    hooks = [model.model.visual.register_forward_pre_hook(lambda *a: calls.append(1)),
             model.model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))]
    try:
        with pytest.raises(ValueError, match=match.replace("|", r"\|").replace("(", r"\(")):
            model.generate(**{"max_new_tokens": 4, **kwargs})
    finally:
        for h in hooks:
            h.remove()
    assert not calls


def test_unknown_argument_is_a_type_error(model):
    ids, _ = single("text")
    with pytest.raises(TypeError, match="num_beam_groups"):
        model.generate(input_ids=ids, num_beam_groups=2)
