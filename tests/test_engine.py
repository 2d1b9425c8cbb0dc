"""Continuous-batching engine: batched decode over rows of different lengths equals running alone; greedy
outputs equal a cache-free reference and transformers; scheduling (queueing, aborts, n, seeds, stop handling);
AsyncEngine streaming / cancel / shutdown. Tiny random fp32 models (weights scaled so greedy outputs vary)."""
from __future__ import annotations

import asyncio
import json
import os
import threading

import pytest
import torch

from qwen2vl.engine import LLM, AsyncEngine, LLMEngine, RequestRejected, SamplingParams
from qwen2vl.engine.kv_pool import parse_memory
from tiny import mm_token_type_ids, oracle_from, pixels, sample, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def scaled(model, factor: float = 10.0):
    """Random tiny models emit one token forever; larger weights give varied greedy continuations."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    return model


def build_model_dir(path: str, seed: int = 0, intermediate_size: int = 37) -> dict:
    """A tiny random Qwen2-VL checkpoint + demo tokenizer + processor config in `path` (vocab 428 → 448 rows).
    intermediate_size 36 makes it splittable over 2 tensor-parallel ranks."""
    from qwen2vl.configuration import Qwen2VLConfig
    from qwen2vl.demo.build_tokenizer import save_demo_tokenizer
    from qwen2vl.model import Qwen2VLForConditionalGeneration

    ids = save_demo_tokenizer(path)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=ids["model_vocab_size"], hidden_size=32, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, tie_word_embeddings=True,
                         pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"],
                         eos_token_id=ids["eos_token_id"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    scaled(Qwen2VLForConditionalGeneration(cfg).eval()).save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 112 * 112,
                   "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}, f)
    return ids


@pytest.fixture(scope="module")
def model():
    return scaled(tiny_model(seed=1))


def prompts(k: int = 6):
    """Token-id prompts of different lengths; every other one with an image of a different size."""
    out = []
    for i in range(k):
        grid = [1, 4, 4] if i % 4 == 0 else [1, 2, 6]
        grids = [("image", grid)] if i % 2 == 0 else []
        p = {"prompt_token_ids": sample(3 + i, grids, 2 + 2 * i, 2, seed=i)}
        if grids:
            p["pixel_values"], p["image_grid_thw"] = pixels([grid], seed=i), torch.tensor([grid])
        out.append(p)
    return out


@torch.inference_mode()
def naive_greedy(model, p, n: int) -> list[int]:
    """Reference: one sequence, the model's own growable cache, argmax each step (no engine involved)."""
    kw = {k: p[k] for k in ("pixel_values", "image_grid_thw") if k in p}
    out = model(input_ids=torch.tensor([p["prompt_token_ids"]]), use_cache=True, **kw)
    ids = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


def test_batched_decode_over_ragged_rows_matches_alone(model):
    ps = prompts(3)
    batched = LLMEngine(model, max_num_seqs=4, max_model_len=64, eos_token_ids=[])
    rows = []
    for i, p in enumerate(ps):  # prefill each into its own row
        req = batched.make_request(p, GREEDY)
        with torch.inference_mode():
            rows.append(batched.runner.prefill(req, batched.pool.allocate(1)))
    assert len(set(batched.pool.cache.lengths[:3])) == 3  # ragged rows
    singles = [LLMEngine(model, max_num_seqs=1, max_model_len=64, eos_token_ids=[]) for _ in ps]
    for eng, p in zip(singles, ps):
        with torch.inference_mode():
            eng.runner.prefill(eng.make_request(p, GREEDY), eng.pool.allocate(1))
    tokens = [int(r.argmax()) for r in rows]
    for _ in range(4):
        with torch.inference_mode():
            logits = batched.runner.decode(tokens, 3)
            alone = [eng.runner.decode([t], 1)[0] for eng, t in zip(singles, tokens)]
        for b in range(3):
            torch.testing.assert_close(logits[b], alone[b], atol=1e-5, rtol=1e-5)
        tokens = logits.argmax(-1).tolist()


def test_greedy_equals_reference_whatever_the_batch(model):
    ps = prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=4 + 2 * i) for i in range(6)]
    # 3 rows for 6 requests: later ones are admitted while earlier ones decode, rows are freed and compacted
    together = LLM(model, max_num_seqs=3, max_model_len=64, eos_token_ids=[]).generate(ps, params, use_tqdm=False)
    alone = LLM(model, max_num_seqs=1, max_model_len=64, eos_token_ids=[])
    for p, sp, out in zip(ps, params, together):
        ref = naive_greedy(model, p, sp.max_tokens)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
        assert alone.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids == ref
    assert len({tuple(o.outputs[0].token_ids) for o in together}) > 1


def test_greedy_matches_transformers(model):
    hf = oracle_from(model, attn="eager")
    p = prompts(1)[0]
    ids = torch.tensor([p["prompt_token_ids"]])
    with torch.inference_mode():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p["pixel_values"],
                          image_grid_thw=p["image_grid_thw"], mm_token_type_ids=mm_token_type_ids(ids), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
    out = LLM(model, max_num_seqs=2, max_model_len=64, eos_token_ids=[]).generate(
        p, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref


def test_n_copies_the_prompt_row_and_seeds_are_batch_independent(model):
    ps = prompts(3)
    llm = LLM(model, max_num_seqs=6, max_model_len=64, eos_token_ids=[])
    greedy_n = llm.generate(ps[0], SamplingParams(temperature=0, n=3, max_tokens=6), use_tqdm=False)[0]
    assert [c.index for c in greedy_n.outputs] == [0, 1, 2]
    assert all(c.token_ids == naive_greedy(model, ps[0], 6) for c in greedy_n.outputs)
    seeded = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, n=2, seed=7, max_tokens=6)
    alone = llm.generate(ps[0], seeded, use_tqdm=False)[0]
    mixed = llm.generate(ps, [seeded, SamplingParams(temperature=0.7, seed=1, max_tokens=9), GREEDY],
                         use_tqdm=False)[0]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids


def test_rejections_and_pool_sizing(model):
    eng = LLMEngine(model, max_num_seqs=2, max_model_len=32, eos_token_ids=[])
    p = prompts(1)[0]
    with pytest.raises(RequestRejected, match="maximum context length is 32"):
        eng.make_request(p, SamplingParams(max_tokens=32))
    with pytest.raises(RequestRejected, match="max_num_seqs=2"):
        eng.make_request(p, SamplingParams(n=3))
    with pytest.raises(RequestRejected, match="placeholder"):
        eng.make_request({"prompt_token_ids": p["prompt_token_ids"]})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    per_row = eng.pool.bytes // 2
    assert LLMEngine(model, max_num_seqs=8, max_model_len=32, kv_cache_memory=3 * per_row).pool.max_num_seqs == 3
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLMEngine(model, max_num_seqs=8, max_model_len=32, kv_cache_memory=per_row - 1)
    assert parse_memory("1.5KiB") == 1536 and parse_memory("2GiB") == 2 << 30


def test_abort_frees_row_and_others_continue(model):
    ps = prompts(3)
    eng = LLMEngine(model, max_num_seqs=3, max_model_len=64, eos_token_ids=[])
    sp = SamplingParams(temperature=0, max_tokens=12)
    reqs = [eng.add_request(p, sp) for p in ps]
    for _ in range(3):
        eng.step()
    assert eng.pool.num_active == 3
    out = eng.abort_request(reqs[0].request_id)
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 3
    assert eng.pool.num_active == 2 and sorted(s.row for s in eng.scheduler.running) == [0, 1]
    finals = {o.request_id: o for o in eng.run_until_done()}
    for p, r in zip(ps[1:], reqs[1:]):
        assert finals[r.request_id].outputs[0].token_ids == naive_greedy(model, p, 12)
    assert eng.pool.num_active == 0 and not eng.has_unfinished_requests()


def test_stop_strings_tokens_and_streamed_text(tmp_path):
    build_model_dir(str(tmp_path))
    llm = LLM(str(tmp_path), max_num_seqs=2, max_model_len=128)
    conv = [{"role": "user", "content": "How many circles are there?"}]
    base = llm.generate(conv, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    assert text == llm.get_tokenizer().decode(ids, skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = llm.generate(conv, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (text[:text.find(stop)], "stop", stop)
    kept = llm.generate(conv, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                             include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.find(stop) + len(stop)]
    tok = ids[5]
    by_id = llm.generate(conv, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == ids[:ids.index(tok) + 1] and by_id.stop_reason == tok
    # streamed deltas add up to the final text, and never show a stop string's beginning
    eng = llm.engine
    req = eng.add_request(conv, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    pieces = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            pieces.append(o.outputs[0].delta_text)
    assert "".join(pieces) == cut.text and req.seqs[0].finish_reason == "stop"


def test_async_engine_stream_cancel_shutdown(model):
    eng = AsyncEngine(LLMEngine(model, max_num_seqs=2, max_model_len=64, eos_token_ids=[]))
    ps = prompts(3)

    async def run():
        async def collect(p, n):
            deltas, last = [], None
            async for out in eng.submit(await eng.process(p), SamplingParams(temperature=0, max_tokens=n)):
                deltas += out.outputs[0].delta_token_ids
                last = out
            assert deltas == last.outputs[0].token_ids and last.finished
            return deltas

        async def cancel_early():
            stream = eng.submit(await eng.process(ps[2]), SamplingParams(temperature=0, max_tokens=40),
                                request_id="to-cancel")
            async for _ in stream:
                break  # leaving the iterator aborts the request
            await stream.aclose()

        results = await asyncio.gather(collect(ps[0], 6), collect(ps[1], 9), cancel_early())
        for _ in range(100):
            if "to-cancel" in eng.aborted:
                break
            await asyncio.sleep(0.02)
        return results

    res = asyncio.run(run())
    assert res[0] == naive_greedy(model, ps[0], 6) and res[1] == naive_greedy(model, ps[1], 9)
    assert "to-cancel" in eng.aborted
    eng.shutdown()
    assert not eng.is_running
    assert not [t for t in threading.enumerate() if t.name.startswith("qwen2vl-")]


def test_detokenizer_utf8_pieces_and_invalid_bytes(tmp_path):
    from qwen2vl.demo.build_tokenizer import save_demo_tokenizer
    from qwen2vl.engine.detokenizer import IncrementalDetokenizer
    from qwen2vl.processing.tokenizer import Qwen2TokenizerFast

    save_demo_tokenizer(str(tmp_path))
    tok = Qwen2TokenizerFast.from_pretrained(str(tmp_path))
    text = "héllo 世界 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    det, pieces = IncrementalDetokenizer(tok, [], SamplingParams()), []
    for t in ids:
        before = det.visible_text()
        det.add(t)
        pieces.append(det.visible_text()[len(before):])
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    lone = tok.encode("é")[:1] * 6  # a lead byte repeated: never a valid character
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    for t in lone:
        det.add(t)
    assert det.visible_text().count("\ufffd") >= 3  # flushed after 4 pending tokens, not held forever
