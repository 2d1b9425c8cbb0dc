"""Sampling parameters through the OpenAI-compatible server: every client setting reaches the engine. A real
uvicorn server over a tiny random checkpoint (demo tokenizer), driven by the `openai` client, against the same
checkpoint offline (`LLM`, same seed) and `generate()`.

Each parameter is checked where it decides the output: the offline result with the setting differs from the one
without it (so a server that dropped the setting would return the latter), and the server returns the former.
"""
from __future__ import annotations

import argparse

import openai
import pytest
import torch

from qwen2vl.engine import LLM, SamplingParams
from qwen2vl.server import ServerThread, add_arguments, build_engine, create_app, settings_from
from test_engine import build_model_dir

CONV = [{"role": "user", "content": "How many circles are there in the picture?"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("srv_sampling")
    build_model_dir(str(model_dir))
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(model_dir), "--served-model-name", "tiny", "--max-num-seqs", "4", "--max-model-len", "256"])
    engine = build_engine(args)
    server = ServerThread(create_app(engine, settings_from(args, engine))).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    offline = LLM(str(model_dir), max_num_seqs=4, max_model_len=256)
    yield dict(client=client, offline=offline, model_dir=model_dir)
    server.stop()


def served(setup, **kw):
    r = setup["client"].chat.completions.create(model="tiny", messages=CONV, **kw)
    return [c.message.content for c in r.choices], r


def offline(setup, **params):
    out = setup["offline"].generate([{"messages": CONV}], SamplingParams(**params), use_tqdm=False)[0]
    return [c.text for c in out.outputs], out


SAMPLED = dict(temperature=1.0, seed=1234, max_tokens=24, n=2)
SETTINGS = {  # OpenAI-client keyword → value; vLLM's extra fields go through extra_body
    "top_p": 0.3,
    "top_k": 3,
    "min_p": 0.3,
    "repetition_penalty": 1.6,
    "presence_penalty": 1.5,
    "frequency_penalty": 1.5,
    "temperature": 0.3,
}
EXTRA = ("top_k", "min_p", "repetition_penalty")


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_sampling_setting_reaches_the_engine(setup, name):
    value = SETTINGS[name]
    # the penalty needs the greedy path to matter on this model (sampling at temperature 1 is nearly uniform)
    sampled = {**SAMPLED, "temperature": 0.0} if name == "repetition_penalty" else SAMPLED
    params = {**sampled, name: value}
    with_it, _ = offline(setup, **params)
    without, _ = offline(setup, **sampled)
    assert with_it != without, f"{name}={value} does not change this output; the test would be blind"
    base = {k: v for k, v in params.items() if k not in EXTRA and k != "max_tokens"}
    extra = {k: v for k, v in params.items() if k in EXTRA}
    got, _ = served(setup, max_completion_tokens=params["max_tokens"], extra_body=extra, **base)
    assert got == with_it


def test_greedy_penalty_equals_generate(setup):
    """temperature 0 + repetition_penalty through the server = generate() on the same prompt ids."""
    from qwen2vl import Qwen2VLForConditionalGeneration

    text, out = offline(setup, temperature=0, max_tokens=20, repetition_penalty=1.4, ignore_eos=True)
    got, _ = served(setup, temperature=0, max_tokens=20, extra_body={"repetition_penalty": 1.4,
                                                                     "ignore_eos": True})
    model = Qwen2VLForConditionalGeneration.from_pretrained(setup["model_dir"])
    ids = torch.tensor([out.prompt_token_ids])
    gen = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.4,
                         eos_token_id=None)[0, ids.shape[1]:].tolist()
    tok = setup["offline"].get_tokenizer()
    assert out.outputs[0].token_ids == gen
    assert got == text == [tok.decode(gen, skip_special_tokens=True)]


def test_stop_string_equals_generate(setup):
    """The server's text for stop=[s] is generate(stop_strings=s)'s decoded continuation cut before s (OpenAI:
    the stop string is not returned; generate() keeps the token that completed it)."""
    from qwen2vl import Qwen2VLForConditionalGeneration

    _, out = offline(setup, temperature=0, max_tokens=24, ignore_eos=True)
    text = out.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    got, r = served(setup, temperature=0, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True})
    model = Qwen2VLForConditionalGeneration.from_pretrained(setup["model_dir"])
    tok = setup["offline"].get_tokenizer()
    ids = torch.tensor([out.prompt_token_ids])
    gen = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                         stop_strings=stop, tokenizer=tok)[0, ids.shape[1]:].tolist()
    decoded = tok.decode(gen, skip_special_tokens=True)
    assert len(gen) < 24 and stop in decoded
    assert got == [decoded[:decoded.find(stop)]] and r.choices[0].finish_reason == "stop"


def test_lengths_stops_and_min_tokens(setup):
    greedy = dict(temperature=0, extra_body={"ignore_eos": True})
    full, _ = offline(setup, temperature=0, max_tokens=24, ignore_eos=True)
    text = full[0]
    got, r = served(setup, max_completion_tokens=7, **greedy)
    ref, ref_out = offline(setup, temperature=0, max_tokens=7, ignore_eos=True)
    assert got == ref and r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    assert text.startswith(ref[0])
    # max_completion_tokens wins over the legacy max_tokens
    got, r = served(setup, max_completion_tokens=5, max_tokens=20, **greedy)
    assert r.usage.completion_tokens == 5
    # a stop string ends the text before it
    stop = text[len(text) // 2: len(text) // 2 + 2]
    got, r = served(setup, max_tokens=24, stop=[stop], **greedy)
    assert got == [text[:text.find(stop)]] and r.choices[0].finish_reason == "stop"
    # stop token ids, and min_tokens holding them off
    _, out = offline(setup, temperature=0, max_tokens=24, ignore_eos=True)
    ids = out.outputs[0].token_ids
    tok = ids[3]
    first = ids.index(tok)
    body = {"ignore_eos": True, "stop_token_ids": [tok]}
    _, r = served(setup, temperature=0, max_tokens=24, extra_body=body)
    assert r.usage.completion_tokens == first + 1 and r.choices[0].finish_reason == "stop"
    got, r = served(setup, temperature=0, max_tokens=24, extra_body={**body, "min_tokens": first + 2})
    ref, ref_out = offline(setup, temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[tok],
                           min_tokens=first + 2)
    assert got == ref and r.usage.completion_tokens == len(ref_out.outputs[0].token_ids) >= first + 2


def test_seed_reproducible_and_matches_offline(setup):
    a, _ = served(setup, temperature=1.2, seed=7, max_tokens=16, n=2)
    assert a == served(setup, temperature=1.2, seed=7, max_tokens=16, n=2)[0]
    assert a == offline(setup, temperature=1.2, seed=7, max_tokens=16, n=2)[0]
    assert a != served(setup, temperature=1.2, seed=8, max_tokens=16, n=2)[0]
    assert a[0] != a[1]
