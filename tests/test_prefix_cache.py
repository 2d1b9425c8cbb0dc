"""KV prefix cache, vision cache and chunked prefill in the engine (issue #23): outputs with caching / chunking on
equal the cache-free reference token for token (greedy, fp32 tiny model with scaled weights so greedy outputs
vary, and the demo model), and the caches are keyed by media *content*: two pictures with the same placeholder
tokens never share KV, nor does one picture at two `max_pixels`."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from qwen2vl.engine import LLM, LLMEngine, SamplingParams
from test_engine import naive_greedy, scaled
from tiny import IMG, VE, VS, pixels, tiny_model

SYS = list(range(10, 30))  # a 20-token "system prompt" shared by every prompt below
N_OUT = 6


@pytest.fixture(scope="module")
def model():
    return scaled(tiny_model(seed=3))


def image_prompt(question: list[int], image_seed: int, grid=(1, 4, 4), before=SYS) -> dict:
    n = grid[0] * grid[1] * grid[2] // 4
    return {"prompt_token_ids": before + [VS] + [IMG] * n + [VE] + question,
            "pixel_values": pixels([list(grid)], seed=image_seed), "image_grid_thw": torch.tensor([list(grid)])}


def llm(model, **kw) -> LLM:
    return LLM(model, max_num_seqs=4, max_model_len=160, eos_token_ids=[], **kw)


def generate(engine: LLM, prompts: list[dict], n: int = N_OUT):
    return engine.generate(prompts, SamplingParams(temperature=0, max_tokens=n), use_tqdm=False)


def test_same_picture_again_reuses_its_kv_and_answers_the_same(model):
    engine = llm(model)
    first, second = image_prompt([40, 41, 42], 1), image_prompt([50, 51], 1)
    out1, = generate(engine, [first])
    out2, = generate(engine, [second])
    assert out1.num_cached_tokens == 0
    image_end = len(SYS) + 1 + 4 + 1
    assert out2.num_cached_tokens == image_end   # system prompt + the whole picture, up to where the text differs
    for p, out in ((first, out1), (second, out2)):
        assert out.outputs[0].token_ids == naive_greedy(model, p, N_OUT)
    stats = engine.engine.stats()
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_cached_tokens"] == image_end


def test_next_turn_reuses_the_previous_prompt_and_answer(model):
    engine = llm(model)
    turn1 = image_prompt([40, 41, 42], 2)
    out1, = generate(engine, [turn1])
    answer = out1.outputs[0].token_ids
    turn2 = dict(turn1, prompt_token_ids=turn1["prompt_token_ids"] + answer + [60, 61, 62])
    out2, = generate(engine, [turn2])
    # everything whose KV exists: the first turn's prompt and its answer but the last token (never fed back)
    assert out2.num_cached_tokens == len(turn1["prompt_token_ids"]) + len(answer) - 1
    assert out2.outputs[0].token_ids == naive_greedy(model, turn2, N_OUT)


def test_two_pictures_with_the_same_placeholders_never_share(model):
    a, b = image_prompt([40, 41], 4), image_prompt([40, 41], 5)
    assert a["prompt_token_ids"] == b["prompt_token_ids"]
    ref_a, ref_b = naive_greedy(model, a, N_OUT), naive_greedy(model, b, N_OUT)
    assert ref_a != ref_b, "the two pictures must lead to different answers for this test to mean anything"
    engine = llm(model)
    out_a, = generate(engine, [a])
    out_b, = generate(engine, [b])
    # the match stops at the first placeholder: its key is the picture's content, not the token id
    assert out_b.num_cached_tokens == len(SYS) + 1
    assert out_a.outputs[0].token_ids == ref_a and out_b.outputs[0].token_ids == ref_b


def test_same_picture_at_another_position_hits_the_vision_cache_only(model):
    engine = llm(model)
    a = image_prompt([40, 41], 6)
    b = image_prompt([40, 41], 6, before=[77] * 5 + SYS)
    generate(engine, [a])
    out_b, = generate(engine, [b])
    assert out_b.num_cached_tokens == 0
    stats = engine.engine.stats()
    assert stats["vision_cache_misses"] == 1 and stats["vision_cache_hits"] == 1
    assert out_b.outputs[0].token_ids == naive_greedy(model, b, N_OUT)


def test_eviction_under_a_tiny_budget_keeps_answers_exact(model):
    per_token = 2 * 2 * 2 * 8 * 4  # K+V x layers x kv heads x head dim x fp32
    engine = llm(model, prefix_cache_memory=60 * per_token)
    prompts = [image_prompt([40 + i, 41], i % 3) for i in range(6)]
    outs = [generate(engine, [p])[0] for p in prompts]
    stats = engine.engine.stats()
    assert stats["prefix_cache_bytes"] <= 60 * per_token and stats["prefix_cache_entries"] <= 2
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == naive_greedy(model, p, N_OUT)
    assert set(engine.engine.runner.worker.stashed) == set(engine.engine.prefix.entries)  # dropped KV is freed


def test_concurrent_requests_sharing_a_prefix(model):
    engine = llm(model)
    prompts = [image_prompt([40 + i, 41, 42], 7) for i in range(4)]
    outs = generate(engine, prompts)
    assert sum(o.num_cached_tokens for o in outs) >= 3 * (len(SYS) + 6)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == naive_greedy(model, p, N_OUT)


@pytest.mark.parametrize("chunk", [3, 7, 16])
def test_chunked_prefill_equals_whole_prefill(model, chunk):
    prompts = [image_prompt([40, 41, 42], 8, grid=(1, 4, 8)), image_prompt([43], 9),
               {"prompt_token_ids": list(range(7, 60))}]
    engine = llm(model, max_prefill_tokens_per_step=chunk, enable_prefix_caching=False)
    outs = generate(engine, prompts)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == naive_greedy(model, p, N_OUT)
    assert engine.engine.pool.reserved == 0 and engine.engine.partial is None


def beside_streams(engine, prompt, count, short_tokens: int, big_tokens: int = 4):
    """Two short requests decode while `prompt` is prefilled; each must gain a token every step. Returns (the short
    requests, the big one, the number of steps with `count(big)` true)."""
    short = [engine.add_request({"prompt_token_ids": [20 + i, 21, 22]},
                                SamplingParams(temperature=0, max_tokens=short_tokens)) for i in range(2)]
    engine.step()
    big = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=big_tokens))
    steps = 0
    while big.first_token_time is None:
        before = [len(s.seqs[0].output_ids) for s in short]
        engine.step()
        assert [len(s.seqs[0].output_ids) for s in short] == [b + 1 for b in before]  # one token each, every step
        steps += bool(count(big))
    return short, big, steps


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(model):
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=200, eos_token_ids=[], max_prefill_tokens_per_step=8,
                       enable_prefix_caching=False)
    long = image_prompt(list(range(30, 60)), 10, grid=(1, 8, 8))      # 20 + 18 + 30 = 68 prompt tokens
    short, big, partial_steps = beside_streams(engine, long, lambda r: engine.partial is r, 60)
    assert partial_steps >= 6
    finals = {o.request_id: o for o in engine.run_until_done()}
    assert finals[big.request_id].outputs[0].token_ids == naive_greedy(model, long, 4)
    for s in short:
        p = {"prompt_token_ids": s.prompt_token_ids}
        assert s.seqs[0].output_ids == naive_greedy(model, p, 60)


def test_abort_mid_prefill_gives_the_rows_back(model):
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=200, eos_token_ids=[], max_prefill_tokens_per_step=8)
    req = engine.add_request(image_prompt(list(range(30, 60)), 11, grid=(1, 8, 8)), SamplingParams(max_tokens=4))
    engine.step()
    assert engine.partial is req and engine.pool.num_free == 1
    engine.abort_request(req.request_id)
    assert engine.partial is None and engine.pool.num_free == 2 and engine.pool.reserved == 0


# ---- through the processor: real pictures, max_pixels, the demo model ----
def picture(seed: int, size=(112, 112)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def test_same_file_at_another_max_pixels_does_not_share(tmp_path):
    from test_engine import build_model_dir

    build_model_dir(str(tmp_path))
    engine = LLM(str(tmp_path), max_num_seqs=2, max_model_len=256, eos_token_ids=[])
    img = picture(12)

    def ask(max_pixels):
        msgs = [{"role": "user", "content": [{"type": "image", "image": img, "max_pixels": max_pixels},
                                             {"type": "text", "text": "What is it?"}]}]
        return generate(engine, [msgs])[0]

    big, small = ask(112 * 112), ask(56 * 56)
    again = ask(56 * 56)
    vs = engine.get_tokenizer().convert_tokens_to_ids("<|vision_start|>")
    start = small.prompt_token_ids.index(vs) + 1
    assert small.num_cached_tokens <= start    # nothing of the other grid's picture is reused
    assert again.num_cached_tokens > start     # the same picture at the same max_pixels is
    stats = engine.engine.stats()
    assert stats["vision_cache_misses"] == 2
    fresh = LLM(str(tmp_path), max_num_seqs=2, max_model_len=256, eos_token_ids=[], enable_prefix_caching=False,
                vision_cache_memory=0)
    for out, mp in ((big, 112 * 112), (small, 56 * 56), (again, 56 * 56)):
        msgs = [{"role": "user", "content": [{"type": "image", "image": img, "max_pixels": mp},
                                             {"type": "text", "text": "What is it?"}]}]
        assert generate(fresh, [msgs])[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_demo_model_multi_turn_with_and_without_caching():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "qwen2vl" / "demo" / "assets" / "example1.png"
    turn1 = [{"role": "user", "content": [{"type": "image", "image": str(example)},
                                          {"type": "text", "text": "How many shapes are there?"}]}]
    results = {}
    for caching in (True, False):
        engine = LLM("qwen2vl-demo", max_num_seqs=2, enable_prefix_caching=caching)
        first = engine.generate([turn1], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
        turn2 = turn1 + [{"role": "assistant", "content": first.outputs[0].text},
                         {"role": "user", "content": "What is in the top left?"}]
        second = engine.generate([turn2], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
        results[caching] = (first.outputs[0].token_ids, second.outputs[0].token_ids, second.num_cached_tokens)
    assert results[True][:2] == results[False][:2]
    assert results[False][2] == 0 and results[True][2] >= len(first.prompt_token_ids)


def test_server_reports_cached_tokens_and_cache_stats(tmp_path):
    import argparse

    import httpx

    from qwen2vl.server import ServerThread, add_arguments, build_engine, create_app, settings_from
    from test_engine import build_model_dir
    from test_server import data_url, image_msg, png

    build_model_dir(str(tmp_path))
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tmp_path), "--max-num-seqs", "2", "--max-model-len", "256", "--vision-cache-mb", "8",
         "--max-prefill-tokens-per-step", "16"])
    engine = build_engine(args)
    with ServerThread(create_app(engine, settings_from(args, engine))) as srv:
        body = {"messages": image_msg(data_url(png((20, 200, 20)))), "max_tokens": 4, "temperature": 0}
        first = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        second = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        health = httpx.get(srv.url + "/health").json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == second["usage"]["prompt_tokens"] - 1        # all but the last prompt token
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert health["prefix_cache_hits"] == 1 and health["vision_cache_misses"] == 1 and "prefilling" in health
