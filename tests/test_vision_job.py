"""The vision tower as a resumable job (issue #23): with chunked prefill the engine encodes a picture a bounded
slice per step between the running streams' decode steps. The job's features have the bits of the one-shot
tower; answers equal the unchunked reference token for token; the vision cache still serves and is filled."""
from __future__ import annotations

import math

import pytest
import torch

from qwen2vl.engine import LLMEngine, SamplingParams
from qwen2vl.kernels import cpu_ops
from qwen2vl.model import vision, vision_job
from qwen2vl.model.vision_job import ATTENTION, LINEAR, VisionEncodeJob
from test_engine import naive_greedy, scaled
from test_prefix_cache import beside_streams, image_prompt
from tiny import pixels, real_heads_model, tiny_model


def run_sliced(visual, px, grid, budget, rows=None):
    """Run a job `budget` flops at a time; returns (features, per-call flops, largest unit)."""
    job = VisionEncodeJob(visual, px, torch.tensor(grid), rows=rows)
    spends, largest = [], 0
    while not job.done:
        largest = max(largest, job.next_cost)
        spends.append(job.run(budget))
    return job.result, spends, largest


@torch.inference_mode()
def test_job_equals_one_shot_tower_bit_for_bit_fp32():
    visual = tiny_model(seed=1).model.visual
    grid = [[1, 4, 8], [2, 4, 4], [1, 2, 2]]            # a picture, a 2-frame video's frames, a small one
    px = pixels(grid, seed=2)
    ref = visual(px, torch.tensor(grid))
    feats, spends, largest = run_sliced(visual, px, grid, budget=1)
    assert torch.equal(feats, ref)
    assert len(spends) > 8 and max(spends) <= largest   # one unit per call with a tiny budget
    feats, spends, _ = run_sliced(visual, px, grid, budget=float("inf"))
    assert torch.equal(feats, ref) and len(spends) == 1


@torch.inference_mode()
def test_row_chunked_units_keep_the_bits_and_stay_small_fp32(monkeypatch):
    """With 24-row chunks (vision.ROWS) the one-shot tower and the job both run the patch embedding, qkv, proj,
    the MLP's two halves and the merger's two linears per chunk: same bits, and no unit grows with the picture."""
    monkeypatch.setattr(vision, "ROWS", 24)
    visual = tiny_model(seed=1).model.visual
    linear_units = {}
    for grid in ([[1, 8, 12]], [[1, 16, 24], [2, 4, 4]]):  # 96 patches; 384 + 32
        px = pixels(grid, seed=4)
        ref = visual(px, torch.tensor(grid))
        job = VisionEncodeJob(visual, px, torch.tensor(grid))
        units = []
        while not job.done:
            units.append(job.next_unit)
            job.run(0)                                   # exactly one unit per call
        assert torch.equal(job.result, ref) and job.units_run == len(units)
        linear_units[len(px)] = max(f for f, kind in units if kind == LINEAR)
    assert linear_units[416] == linear_units[96]          # the largest linear unit does not grow with the picture


@torch.inference_mode()
def test_job_on_the_kernel_path_slices_attention_and_keeps_the_bits(monkeypatch):
    """bf16, vision head 80, >= 256 patches: the fused CPU kernel runs in slices of heads x queries of
    ~SLICE_FLOPS, the linears / MLP / merger in vision.ROWS-row chunks; the one-shot tower runs the same chunks."""
    if cpu_ops.kernel("vision_attention") is None or not cpu_ops.has_avx512bf16():
        pytest.skip("no AVX512-BF16 vision attention kernel on this CPU")
    visual = real_heads_model().to(torch.bfloat16).model.visual
    grid = [[1, 36, 40], [1, 8, 8]]                      # 1440 + 64 patches: > vision.ROWS rows
    px = pixels(grid, seed=3).to(torch.bfloat16)
    ref = visual(px, torch.tensor(grid))
    monkeypatch.setattr(vision_job, "SLICE_FLOPS", 4 * 100 * 1440 * 80)  # ~100-query slices of one head
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)               # one head a slice
    assert vision_job.attention_slices(1440, 2, 80) == (1, 96)
    job = VisionEncodeJob(visual, px, torch.tensor(grid))
    attention, largest = [], 0
    while not job.done:
        if job.next_unit[1] == ATTENTION:
            attention.append(job.next_unit[0])
        largest = max(largest, job.next_cost)
        job.run(0)
    assert torch.equal(job.result, ref)
    # 2 blocks x 2 heads x (15 slices of the big picture + 1 of the small one)
    assert len(attention) == 2 * 2 * (15 + 1) and max(attention) == 4 * 96 * 1440 * 80
    feats, spends, _ = run_sliced(visual, px, grid, budget=3 * largest)
    assert torch.equal(feats, ref) and len(spends) >= 10 and max(spends) <= 3 * largest


@torch.inference_mode()
def test_run_fits_units_in_a_budget_by_their_kind():
    """run(budget, weights) runs units while flops x weights[kind] fits (seconds with measured rates), at least
    one unless told not to; an unmeasured kind (weight inf) runs only alone."""
    visual = tiny_model(seed=1).model.visual
    grid = [[1, 4, 8]]
    units = []
    job = VisionEncodeJob(visual, pixels(grid), torch.tensor(grid))
    while not job.done:
        units.append(job.next_unit)
        job.run(0)
    weights = {LINEAR: 1e-9, ATTENTION: 3e-9}             # 1 and 0.33 GF/s
    cost = [f * weights[k] for f, k in units]
    budget = sum(cost[:5]) + 0.5 * cost[5]
    job = VisionEncodeJob(visual, pixels(grid), torch.tensor(grid), clock=iter(range(1000)).__next__)
    assert job.run(budget, weights) == pytest.approx(sum(cost[:5])) and job.units_run == 5
    assert job.run(0, weights, at_least_one=False) == 0 and job.units_run == 5
    kinds = {k for _, k in units[:5]}
    assert {k: f for k, (f, _) in job.timings.items()} == {
        k: sum(f for f, kind in units[:5] if kind == k) for k in kinds}
    assert all(sec == sum(1 for _, kind in units[:5] if kind == k) for k, (_, sec) in job.timings.items())
    unmeasured = {LINEAR: math.inf, ATTENTION: math.inf}
    job.run(1e9, unmeasured)
    assert job.units_run == 6                            # one unit alone


@torch.inference_mode()
def test_kernel_choices_are_made_before_the_job_asks(monkeypatch):
    """make_choices (run on a processing thread) asks `choose` for every decision the job's units will ask for."""
    from qwen2vl.kernels import choose
    from qwen2vl.model.vision_job import make_choices

    asked = []
    monkeypatch.setattr(choose, "decide", lambda op, key, build, timed=True: asked.append((op, key)))
    visual = real_heads_model().to(torch.bfloat16).model.visual
    grid = [[1, 36, 40], [1, 2, 4]]
    make_choices(visual, 1448)
    made, asked[:] = set(asked), []
    run_sliced(visual, pixels(grid).to(torch.bfloat16), grid, budget=1)
    assert asked and set(asked) <= made


@pytest.fixture(scope="module")
def model():
    return scaled(tiny_model(seed=3))


def engine(model, **kw):
    return LLMEngine(model, max_num_seqs=4, max_model_len=240, eos_token_ids=[], max_prefill_tokens_per_step=8,
                     enable_prefix_caching=False, **kw)


@pytest.mark.parametrize("vision_cache", ["64MiB", 0])
def test_streams_keep_decoding_while_a_picture_is_encoded_and_answers_match(model, vision_cache):
    eng = engine(model, vision_cache_memory=vision_cache)
    big_prompt = image_prompt([40, 41, 42], 12, grid=(1, 16, 16))   # 256 patches, 64 placeholders
    short, big, vision_steps = beside_streams(eng, big_prompt, lambda r: r.vision_pending, 40, big_tokens=5)
    assert vision_steps >= 5                                # the tower ran over many steps (2 blocks x 4 units)
    finals = {o.request_id: o for o in eng.run_until_done()}
    assert finals[big.request_id].outputs[0].token_ids == naive_greedy(model, big_prompt, 5)
    if vision_cache:  # the running rows were not disturbed (once is enough)
        for s in short:
            assert s.seqs[0].output_ids == naive_greedy(model, {"prompt_token_ids": s.prompt_token_ids}, 40)
    worker = eng.runner.worker
    assert worker.vision_jobs.work == {}                    # the job's held features are let go
    assert len(worker.vision_cache) == (1 if vision_cache else 0)


def test_a_cached_picture_needs_no_vision_work(model):
    eng = engine(model)
    p = image_prompt([40], 13, grid=(1, 8, 8))
    eng.add_request(p, SamplingParams(temperature=0, max_tokens=3))
    first = eng.run_until_done()[0].outputs[0].token_ids
    misses = eng.stats()["vision_cache_misses"]
    again = eng.add_request(image_prompt([40], 13, grid=(1, 8, 8)), SamplingParams(temperature=0, max_tokens=3))
    eng.step()
    assert not again.vision_pending
    assert eng.run_until_done()[0].outputs[0].token_ids == first == naive_greedy(model, p, 3)
    assert eng.stats()["vision_cache_misses"] == misses and eng.stats()["vision_cache_hits"] >= 1


def test_abort_during_the_encode_drops_the_job(model):
    eng = engine(model)
    req = eng.add_request(image_prompt([40], 14, grid=(1, 16, 16)), SamplingParams(max_tokens=3))
    eng.step()
    assert req.vision_pending and eng.runner.worker.vision_jobs.work
    eng.abort_request(req.request_id)
    assert eng.runner.worker.vision_jobs.work == {} and eng.pool.reserved == 0


def test_a_tiny_time_budget_runs_one_vision_unit_a_step(model):
    """max_prefill_ms_per_step far below any unit: every step still runs exactly one vision unit (at least one),
    then text chunks of the smallest size; the streams gain a token every step and the answer is unchanged."""
    from qwen2vl.engine.prefill_budget import MIN_TEXT_TOKENS

    prompt = image_prompt([40, 41, 42], 15, grid=(1, 16, 16))   # 256 patches, 64 placeholders: 89 tokens
    px, grid = prompt["pixel_values"], prompt["image_grid_thw"]
    with torch.inference_mode():
        _, spends, _ = run_sliced(model.model.visual, px, grid.tolist(), budget=0)
    eng = LLMEngine(model, max_num_seqs=4, max_model_len=240, eos_token_ids=[], max_prefill_ms_per_step=1e-6,
                    enable_prefix_caching=False)
    _, big, steps = beside_streams(eng, prompt, lambda r: True, 40, big_tokens=5)
    # one piece of work a step: the second short prompt's prefill, a vision unit a step (the last one's step does
    # no text), then text chunks of the smallest size
    assert steps == 1 + len(spends) + math.ceil(89 / MIN_TEXT_TOKENS)
    finals = {o.request_id: o for o in eng.run_until_done()}
    assert finals[big.request_id].outputs[0].token_ids == naive_greedy(model, prompt, 5)
