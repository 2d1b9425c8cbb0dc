"""Static decode path (`generate(..., compile=True)`, `StaticDecoder`): equivalence with the eager decode path
(fp32: same tokens, logits within 1e-4), one compiled smoke test, and clear errors for GPU-only options.

Most tests run the static step uncompiled (`static_decode._compiled` patched to the plain function): the math
and state handling are the same, and inductor compiles are too slow for every case on a shared CPU.
"""
import importlib
import time

import pytest
import torch

from test_generation import model  # noqa: F401  (fixture: the scaled tiny model; one_thread comes from conftest)
from tiny import PAD, left_pad, pixels, sample, tiny_model

from qwen2vl.generation import GenerationConfig
from qwen2vl.model import static_decode
from qwen2vl.model.static_decode import StaticDecoder, get_static_decoder
from qwen2vl.model.cache import KVCache

generate_module = importlib.import_module("qwen2vl.generation.generate")
MERGE = 2
NEW = 16
NO_EOS = 1000


@pytest.fixture
def uncompiled(monkeypatch):
    monkeypatch.setattr(static_decode, "_compiled", lambda mode: static_decode.decode_forward)


def prompts(case):
    """(ids, mask, media kwargs) for 'text', 'image' and a left-padded mixed 'batch'."""
    if case == "text":
        ids = torch.tensor([sample(5, [], 4, MERGE, seed=0)])
        return ids, torch.ones_like(ids), {}
    if case == "image":
        ids = torch.tensor([sample(3, [("image", [1, 4, 6])], 4, MERGE, seed=1)])
        return ids, torch.ones_like(ids), dict(pixel_values=pixels([[1, 4, 6]]),
                                               image_grid_thw=torch.tensor([[1, 4, 6]]))
    grids = [[1, 4, 4], [1, 2, 6]]
    seqs = [sample(3, [("image", grids[0])], 4, MERGE, seed=2), sample(2, [], 3, MERGE, seed=3),
            sample(1, [("image", grids[1])], 9, MERGE, seed=4)]
    ids, mask = left_pad(seqs)
    return ids, mask, dict(pixel_values=torch.cat([pixels([grids[0]], 2), pixels([grids[1]], 4)]),
                           image_grid_thw=torch.tensor(grids))


def run(model, case, **kw):
    ids, mask, media = prompts(case)
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("eos_token_id", NO_EOS)
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **media, **kw)


# --------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("case", ["text", "image", "batch"])
def test_static_generate_matches_eager(model, uncompiled, case):
    eager = run(model, case, return_dict_in_generate=True, output_logits=True)
    static = run(model, case, compile=True, return_dict_in_generate=True, output_logits=True)
    assert static.sequences.shape == eager.sequences.shape
    assert torch.equal(static.sequences, eager.sequences)
    assert len(set(eager.sequences[0, -NEW:].tolist())) > 3  # a meaningful continuation
    for a, b in zip(static.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_step_logits_match_the_eager_decode_step(model):
    """StaticDecoder.step against `_decode_step` on the same tokens, step by step (left-padded batch with
    images: per-row positions from the rope deltas, pads masked)."""
    ids, mask, media = prompts("batch")
    b, s = ids.shape
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        cache = KVCache.from_config(model.config.text_config, b, s + NEW, dtype, "cpu")
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, **media).logits[:, -1]
        dec = StaticDecoder(model, b, s + NEW, compile=False)
        dec.adopt(cache, mask)
        full_mask = torch.cat([mask, torch.ones(b, NEW, dtype=torch.long)], 1)
        for step in range(NEW - 1):
            tokens = logits.argmax(-1)[:, None]
            ref = generate_module._decode_step(model, tokens, full_mask[:, :s + step + 1], cache)
            got = dec.step(tokens)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            logits = ref
    assert dec.lengths.tolist() == [s + NEW - 1] * b
    assert torch.equal(dec.next_pos, torch.tensor(cache.real_lengths) + cache.rope_deltas[:, 0])
    assert dec.key_valid[:, :s].eq(mask.bool()).all() and dec.key_valid[:, s:s + NEW - 1].all()
    assert not dec.key_valid[:, s + NEW - 1:].any()


def test_finished_rows_keep_running_and_are_padded(model, uncompiled):
    """Static batch: no rows are dropped; a row that hit EOS is padded exactly as in the eager path."""
    eager = run(model, "batch")
    s = eager.shape[1] - NEW
    eos = int(eager[1, s + 3])                   # row 1 stops after 4 tokens
    a = run(model, "batch", eos_token_id=eos, pad_token_id=PAD)
    b = run(model, "batch", eos_token_id=eos, pad_token_id=PAD, compile=True)
    assert torch.equal(a, b)
    assert (b[1, s + 4:] == PAD).all()


def test_decoder_is_reused_across_calls(model, uncompiled):
    run(model, "text", compile=True)
    first = model.static_decoder
    run(model, "text", compile=True, max_new_tokens=NEW - 3)       # same length bucket → same buffers
    assert model.static_decoder is first
    assert first.max_length % static_decode.LENGTH_BUCKET == 0
    run(model, "batch", compile=True)                               # other batch size → replaced
    assert model.static_decoder is not first
    with torch.inference_mode():                                    # built under inference_mode ...
        ref = run(model, "image", compile=True)
    assert torch.equal(run(model, "image", compile=True), ref)      # ... still usable outside it
    static_decode.release_static_decoder(model)
    assert model.static_decoder is None


def test_seeded_sampling_is_unchanged(model, uncompiled):
    ids, mask, media = prompts("image")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS, do_sample=True,
              top_k=20, seed=7, **media)
    assert torch.equal(model.generate(**kw), model.generate(compile=True, **kw))


# --------------------------------------------------------------------------------------------- errors
def test_compile_option_validation(model):
    with pytest.raises(ValueError, match="compile must be"):
        run(model, "text", compile="fast")
    cfg = GenerationConfig(compile=True)
    assert GenerationConfig.from_dict(cfg.to_dict()).compile is True
    assert GenerationConfig().merged().compile is False


def test_static_decoder_errors(model):
    with pytest.raises(ValueError, match="compile mode"):
        StaticDecoder(model, 1, 8, compile=True, mode="turbo")
    dec = StaticDecoder(model, 1, 8, compile=False)
    cache = KVCache.from_config(model.config.text_config, 2, 8)
    with pytest.raises(ValueError, match="rows"):
        dec.adopt(cache)
    cache = KVCache.from_config(model.config.text_config, 1, 8)
    cache.lengths, cache.real_lengths = [6], [6]
    dec.adopt(cache)
    dec.step(torch.tensor([[7]]))
    dec.step(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="full"):
        dec.step(torch.tensor([[9]]))
    with pytest.raises(ValueError, match="tokens must be"):
        dec.step(torch.tensor([[1, 2]]))


def test_gpu_only_options_fail_clearly_on_cpu(model, tmp_path):
    from qwen2vl import Qwen2VLForConditionalGeneration

    model.save_pretrained(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash"):
            Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2",
                                                            progress=False)
        with pytest.raises(ValueError, match="CUDA"):
            Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, device_map="cuda", progress=False)
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, progress=False)
    assert loaded.config.attn_implementation in (None, "sdpa")


# --------------------------------------------------------------------------------------------- compiled
def _inductor_works() -> str | None:
    try:
        fn = torch.compile(lambda x: torch.sin(x) + 1, dynamic=False)
        fn(torch.zeros(4))
    except Exception as e:  # no compiler / broken toolchain
        return f"torch._inductor cannot compile here: {type(e).__name__}: {str(e)[:200]}"
    return None


@pytest.mark.slow
def test_compiled_generate_smoke():
    """torch.compile (inductor on CPU) of the static step: fp32 and bf16 give the eager path's tokens (bf16 too:
    `emulate_precision_casts`, and the CPU GEMV kernel stays in the graph as a custom op)."""
    reason = _inductor_works()
    if reason:
        pytest.skip(reason)
    m = tiny_model(seed=0, merge_size=MERGE, mrope_section=(4, 2, 2), tie=False, layers=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids, mask, _ = prompts("text")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS, do_sample=False)
    start = time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        m.to(dtype)
        eager = m.generate(**kw)
        out = m.generate(compile=True, **kw)
        assert torch.equal(out, eager), dtype
        dec = m.static_decoder
        assert dec.compile and dec.dtype == dtype and dec._fn is static_decode._COMPILED["reduce-overhead"]
    assert time.perf_counter() - start < 90
