"""The per-step prefill time budget (chunked prefill, issue #23): `PrefillBudget` with a fake clock, and the engine
under it with fake costs: each step's prefill stays within its milliseconds, sized from measured costs, while the
running streams gain a token every step."""
from __future__ import annotations

import argparse
import math

import pytest

from qwen2vl.engine import LLMEngine, SamplingParams
from qwen2vl.engine.prefill_budget import IDLE_MS, MIN_TEXT_TOKENS, PrefillBudget, parse_ms
from qwen2vl.model.vision_job import ATTENTION, FLOP_WEIGHTS, LINEAR
from test_engine import naive_greedy, scaled
from test_prefix_cache import beside_streams
from tiny import tiny_model


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_parse_ms_takes_milliseconds_or_auto():
    assert parse_ms(None) is None and parse_ms("auto") == "auto" and parse_ms("12.5") == 12.5 and parse_ms(3) == 3.0
    for bad in ("fast", 0, -5, "inf"):
        with pytest.raises(ValueError, match="max_prefill_ms_per_step"):
            parse_ms(bad)
    with pytest.raises(ValueError, match="max_prefill_tokens_per_step"):
        PrefillBudget(0, None, 1)


def test_cli_option_parses_and_refuses_bad_values(capsys):
    from qwen2vl.server.startup import add_arguments

    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--model", "m", "--max-prefill-ms-per-step", "auto"]).max_prefill_ms_per_step == "auto"
    assert parser.parse_args(["--model", "m", "--max-prefill-ms-per-step", "40"]).max_prefill_ms_per_step == 40.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--max-prefill-ms-per-step", "soon"])
    assert "milliseconds" in capsys.readouterr().err


def test_auto_follows_the_measured_decode_step():
    clock = Clock()
    b = PrefillBudget(None, "auto", 1000, clock)
    b.start_step(decoding=True)                          # no decode step measured yet
    assert b.deadline == pytest.approx(clock.now + IDLE_MS / 1000)
    b.decode_done(0.2)
    b.decode_done(0.1)                                   # running average: 0.7 x 0.2 + 0.3 x 0.1
    b.start_step(decoding=True)
    assert b.deadline == pytest.approx(clock.now + 0.17)
    b.start_step(decoding=False)                         # nothing decodes: nobody to keep waiting less
    assert b.deadline == pytest.approx(clock.now + IDLE_MS / 1000)
    b.start_step(decoding=True)
    b.text_done(MIN_TEXT_TOKENS, 0.05)
    b.decode_done(0.5)                                   # slowed beside a prefill: not the reference
    b.start_step(decoding=True)
    assert b.deadline == pytest.approx(clock.now + 0.17)


def test_text_chunks_are_sized_from_the_measured_cost_per_token():
    clock = Clock()
    b = PrefillBudget(None, 500, 1000, clock)
    b.start_step(decoding=True)
    assert b.text_tokens() == MIN_TEXT_TOKENS            # not measured yet: a small first chunk
    clock.now += 0.125
    b.text_done(16, 0.125)                               # 7.8125 ms a token
    assert b.text_tokens() == 48                         # 375 ms left
    clock.now += 0.25
    assert b.text_tokens() == 16                         # 125 ms left
    clock.now += 0.07
    assert b.text_tokens() == 0                          # less than the smallest chunk left after other work
    b.start_step(decoding=True)
    assert b.text_tokens() == 64                         # 500 ms / 7.8125
    clock.now += 0.4375
    assert b.text_tokens() == MIN_TEXT_TOKENS            # nothing ran yet this step: at least the smallest chunk
    capped = PrefillBudget(20, 300, 1000, clock)         # with a token limit too, it caps the chunk
    capped.token_s = 0.001
    capped.start_step(decoding=True)
    assert capped.text_tokens() == 20
    capped.text_done(20, 0.02)
    assert capped.text_tokens() == 0


def test_vision_budget_in_seconds_with_measured_rates_or_in_flops_by_tokens():
    clock = Clock()
    b = PrefillBudget(None, 50, 1000, clock)
    b.start_step(decoding=True)
    budget, weights, first = b.vision()
    assert budget == pytest.approx(0.05) and first and weights == {LINEAR: math.inf, ATTENTION: math.inf}
    b.vision_done(math.inf, {LINEAR: (4e9, 0.02)})       # one unit ran alone: 200 GF/s measured
    budget, weights, first = b.vision()
    assert not first and weights[LINEAR] == pytest.approx(1 / 200e9) and weights[ATTENTION] == math.inf
    clock.now += 0.06
    assert b.vision()[0] == 0                            # the step's time is spent
    tokens = PrefillBudget(8, None, 1000, clock)         # the token limit alone: its flops, FLOP_WEIGHTS
    tokens.start_step(decoding=True)
    assert tokens.vision() == (8000, FLOP_WEIGHTS, True)
    tokens.vision_done(2500, {})
    assert tokens.text_tokens() == 5


@pytest.fixture(scope="module")
def model():
    return scaled(tiny_model(seed=3))


def fake_costs(engine, clock, decode_s: float, fixed_s: float, token_s: float) -> list[float]:
    """Make the engine's budget clock fake and advance it by the given costs on every decode / prefill call;
    returns the list of prefill seconds, one entry per call."""
    engine.budget.clock = clock
    runner, spent = engine.runner, []
    decode, prefill = runner.decode, runner.prefill

    def timed_decode(*a, **kw):
        clock.now += decode_s
        return decode(*a, **kw)

    def timed_prefill(request, row, start=0, end=None):
        n = (len(request.prompt_token_ids) if end is None else end) - start
        spent.append(fixed_s + token_s * n)
        clock.now += spent[-1]
        return prefill(request, row, start, end)

    runner.decode, runner.prefill = timed_decode, timed_prefill
    return spent


@pytest.mark.parametrize("ms", ["auto", 300])
def test_engine_keeps_each_steps_prefill_within_its_milliseconds(model, ms):
    """Fake costs: a decode step 100 ms, a text chunk 20 ms + 5 ms a token. Every step decodes the running
    streams; its prefill stays within the budget: "auto" = one decode step (MIN_TEXT_TOKENS-token chunks or more, which
    cost 100 ms) once a decode step was measured (before: IDLE_MS), 300 ms with chunks growing as the cost per
    token is learned (from below: a chunk's cost grows less than its length). The answer is the unchunked one."""
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=240, eos_token_ids=[], max_prefill_ms_per_step=ms,
                       enable_prefix_caching=False)
    spent = fake_costs(engine, Clock(), decode_s=0.1, fixed_s=0.02, token_s=0.005)
    prompt = {"prompt_token_ids": [10 + i % 30 for i in range(200)]}
    short, big, steps = beside_streams(engine, prompt, lambda r: engine.partial is r, 60)
    chunks = spent[2:]                                   # after the two short prompts' whole prefills
    assert steps == len(chunks) - 1                      # one chunk a step
    if ms == "auto":
        assert chunks[0] <= IDLE_MS / 1000 and max(chunks[1:]) <= 0.1 + 1e-9   # one undisturbed decode step
        assert min(chunks[1:-1]) >= 0.02 + 0.005 * MIN_TEXT_TOKENS
    else:
        assert max(chunks) <= 0.3 and chunks[:-1] == sorted(chunks[:-1]) and max(chunks) > 0.2
    finals = {o.request_id: o for o in engine.run_until_done()}
    assert finals[big.request_id].outputs[0].token_ids == naive_greedy(model, prompt, 4)


def test_processing_threads_yield_to_the_step_thread():
    """The processing pool's initializer lowers only its own thread's OS priority (Linux niceness is per thread):
    preparing a request must not deschedule the step thread's OpenMP team; the step thread keeps its priority."""
    import os
    import threading

    from qwen2vl.engine.async_engine import _yield_to_the_step_thread

    if not hasattr(os, "getpriority"):
        pytest.skip("no per-thread priorities here")
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def worker():
        _yield_to_the_step_thread()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["nice"] == min(19, main + 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
