"""Sampling parameters end to end: the engine's sampler and generate()'s LogitsPipeline against transformers'
logits processors on identical logits (exact), their sampled tokens against the processed distribution (total
variation over 4000 seeded draws), and the engine (`LLM`) against `generate()` / transformers' `generate` on a
tiny model with spread weights (greedy: exact token ids).

Presence / frequency penalties have no transformers processor: their reference is the OpenAI / vLLM formula
`logit - frequency * count(output) - presence * (count(output) > 0)`, written out here.
"""
import pytest
import torch

from tiny import mm_token_type_ids, oracle_from, spread, tiny_model

from qwen2vl.engine import LLM, SamplingParams
from qwen2vl.engine.sampler import process, sample
from qwen2vl.engine.sequence import Request
from qwen2vl.generation import GenerationConfig
from qwen2vl.generation.logits import LogitsPipeline

V = 99
PROMPT = [7, 8, 9, 9, 30, 31, 40, 7]
OUTPUT = [12, 13, 12, 12, 30, 50]          # counts: 12 -> 3, 13/30/50 -> 1
EOS = 13                                    # in the vocab, so min_tokens has something to ban
NO_EOS = 1000


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def logits_row(seed=0, scale=3.0):
    return torch.randn(1, V, generator=torch.Generator().manual_seed(seed)) * scale


def request(params: SamplingParams, output=OUTPUT) -> Request:
    req = Request("r", PROMPT, params, eos_ids=frozenset({EOS}))
    for s in req.seqs:
        s.output_ids = list(output)
    return req


def hf_processed(scores, ids, *, temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
                 min_new_tokens=0, sampling=True):
    """transformers 5.24's processors in generate()'s order on `scores` (B, V) with history `ids` (list)."""
    from transformers.generation import logits_process as lp

    ids_t = torch.tensor([ids])
    chain = []
    if repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_new_tokens:
        chain.append(lp.MinNewTokensLengthLogitsProcessor(len(PROMPT), min_new_tokens, EOS))
    if sampling:
        if temperature != 1.0:
            chain.append(lp.TemperatureLogitsWarper(temperature))
        if top_k:
            chain.append(lp.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(lp.TopPLogitsWarper(top_p))
        if min_p:
            chain.append(lp.MinPLogitsWarper(min_p))
    for proc in chain:
        scores = proc(ids_t, scores)
    return scores


CONFIGS = {
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=5),
    "top_p": dict(temperature=1.3, top_p=0.7),
    "min_p": dict(min_p=0.15),
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_1": dict(repetition_penalty=0.6, temperature=0.8),
    "all_warpers": dict(repetition_penalty=1.3, temperature=0.9, top_k=12, top_p=0.85, min_p=0.05),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_and_generate_process_like_transformers(name):
    """Identical logits and history → the engine's processed scores, generate()'s LogitsPipeline and
    transformers' processor chain are equal (exact: the same fp32 operations)."""
    cfg = CONFIGS[name]
    scores = logits_row(1)
    ref = hf_processed(scores.clone(), PROMPT + OUTPUT, **cfg)
    engine, _ = process(scores, request(SamplingParams(**cfg)).seqs)
    torch.testing.assert_close(engine, ref, rtol=0, atol=0)
    gen = GenerationConfig(do_sample=True, **{"top_k": 0, **cfg}).merged()
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, PROMPT + OUTPUT] = True
    pipeline = LogitsPipeline(gen, torch.tensor([NO_EOS]), 0, V)
    torch.testing.assert_close(pipeline(scores.clone(), seen, len(OUTPUT)), ref, rtol=0, atol=0)
    assert (ref != scores).any()  # the setting did something


@pytest.mark.parametrize("penalty", [1.8, 0.6])
def test_greedy_rows_get_the_repetition_penalty_only(penalty):
    scores = logits_row(2)
    engine, groups = process(scores, request(SamplingParams(temperature=0, repetition_penalty=penalty)).seqs)
    ref = hf_processed(scores.clone(), PROMPT + OUTPUT, repetition_penalty=penalty, sampling=False)
    assert groups == [] and torch.equal(engine, ref)


@pytest.mark.parametrize("presence, frequency", [(0.0, 0.7), (0.9, 0.0), (-0.5, 1.5), (0.4, -0.8)])
def test_presence_and_frequency_penalties_follow_the_openai_formula(presence, frequency):
    scores = logits_row(3)
    engine, _ = process(scores, request(SamplingParams(temperature=0, presence_penalty=presence,
                                                       frequency_penalty=frequency)).seqs)
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=V).float()
    ref = scores - frequency * counts - presence * (counts > 0).float()
    torch.testing.assert_close(engine, ref, rtol=0, atol=1e-6)
    assert engine[0, 12] - scores[0, 12] == pytest.approx(-3 * frequency - presence, abs=1e-5)
    assert torch.equal(engine[0, PROMPT[:4]], scores[0, PROMPT[:4]])  # prompt-only tokens untouched


def test_min_tokens_bans_eos_and_stop_ids_like_transformers():
    """EOS (and stop_token_ids) are banned while fewer than min_tokens tokens exist: 6 and 7 of 8, not at 8."""
    scores = logits_row(4)
    scores[0, EOS] = scores[0, 77] = 50.0
    params = SamplingParams(temperature=0, min_tokens=8, stop_token_ids=[77])
    keep = torch.ones(V, dtype=torch.bool)
    keep[[EOS, 77]] = False
    for history in (OUTPUT, OUTPUT + [1], OUTPUT + [1, 2]):
        engine, _ = process(scores, request(params, history).seqs)
        ref = hf_processed(scores.clone(), PROMPT + history, min_new_tokens=8, sampling=False)
        banned = len(history) < 8
        assert (engine[0, EOS] == float("-inf")) == (ref[0, EOS] == float("-inf")) == banned
        assert (engine[0, 77] == float("-inf")) == banned
        assert torch.equal(engine[0, keep], ref[0, keep])


DRAWS = 4000


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "all_warpers"])
def test_sampled_tokens_follow_the_processed_distribution(name):
    """4000 seeded draws from the engine's sampler (one generator per sequence) and from generate()'s selection
    (one generator for the batch) stay inside the processed support and within total variation 0.05 of
    softmax(transformers-processed scores) (the sampling noise of 4000 draws is ~0.02)."""
    cfg = CONFIGS[name]
    scores = logits_row(5, scale=1.5)
    probs = hf_processed(scores.clone(), PROMPT + OUTPUT, **cfg).softmax(-1)[0]
    req = request(SamplingParams(n=DRAWS, seed=11, **cfg))
    engine = torch.tensor(sample(scores.expand(DRAWS, V), req.seqs))
    gen = GenerationConfig(do_sample=True, **{"top_k": 0, **cfg}).merged()
    pipeline = LogitsPipeline(gen, torch.tensor([NO_EOS]), 0, V)
    seen = torch.zeros(DRAWS, V, dtype=torch.bool)
    seen[:, PROMPT + OUTPUT] = True
    processed = pipeline(scores.expand(DRAWS, V).clone(), seen, len(OUTPUT))
    generate = pipeline.select(processed, torch.Generator().manual_seed(12))
    for tokens in (engine, generate):
        freq = torch.bincount(tokens, minlength=V).float() / DRAWS
        assert (probs[tokens] > 0).all()
        assert 0.5 * (freq - probs).abs().sum().item() <= 0.05
        assert len(set(tokens.tolist())) > 1


# ------------------------------------------------------------------------------------ engine vs generate()
@pytest.fixture(scope="module")
def model():
    return spread(tiny_model(seed=0, merge_size=2, mrope_section=(4, 2, 2), tie=False), 0.2)


def prompt_ids(seed):
    return torch.randint(7, 90, (1, 9 + seed), generator=torch.Generator().manual_seed(seed))


def engine_tokens(model, ids, eos=(), **params):
    llm = LLM(model, max_num_seqs=2, max_model_len=96, eos_token_ids=list(eos))
    out = llm.generate({"prompt_token_ids": ids[0].tolist()}, SamplingParams(**params), use_tqdm=False)[0]
    return out.outputs[0]


def generate_tokens(model, ids, **kw):
    out = model.generate(input_ids=ids, do_sample=False, **{"eos_token_id": NO_EOS, **kw})
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_engine_repetition_penalty_equals_generate_and_transformers(model, penalty):
    ids = prompt_ids(0)
    eng = engine_tokens(model, ids, temperature=0, max_tokens=16, repetition_penalty=penalty).token_ids
    ours = generate_tokens(model, ids, max_new_tokens=16, repetition_penalty=penalty)
    with torch.no_grad():
        ref = oracle_from(model).generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          mm_token_type_ids=mm_token_type_ids(ids), max_new_tokens=16,
                                          repetition_penalty=penalty, eos_token_id=NO_EOS, pad_token_id=0)
    assert eng == ours == ref[0, ids.shape[1]:].tolist()
    assert eng != engine_tokens(model, ids, temperature=0, max_tokens=16).token_ids


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.5, 0.0), (0.0, -1.5)])
def test_engine_presence_frequency_greedy_equals_reference_loop(model, presence, frequency):
    """Greedy decoding with the penalties: the engine equals a plain loop (full forward each step) applying the
    formula, and the penalty changed the output."""
    ids = prompt_ids(1)
    out = engine_tokens(model, ids, temperature=0, max_tokens=14, presence_penalty=presence,
                        frequency_penalty=frequency).token_ids
    seq, new = ids, []
    with torch.no_grad():
        for _ in range(14):
            logits = model(input_ids=seq, use_cache=False).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=V).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            new.append(int(logits.argmax()))
            seq = torch.cat([seq, torch.tensor([[new[-1]]])], 1)
    assert out == new
    assert out != engine_tokens(model, ids, temperature=0, max_tokens=14).token_ids


def test_engine_length_eos_min_tokens_and_stop_ids_equal_generate(model):
    ids = prompt_ids(2)
    free = generate_tokens(model, ids, max_new_tokens=20)
    out = engine_tokens(model, ids, temperature=0, max_tokens=20)
    assert out.token_ids == free and out.finish_reason == "length"
    assert engine_tokens(model, ids, temperature=0, max_tokens=5).token_ids == free[:5]
    eos = free[2]
    first = free.index(eos)
    out = engine_tokens(model, ids, eos=[eos], temperature=0, max_tokens=20)
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
    # min_tokens / min_new_tokens: EOS is banned for the first 6 tokens, then allowed again.
    ref = generate_tokens(model, ids, max_new_tokens=20, eos_token_id=eos, min_new_tokens=6, pad_token_id=0)
    out = engine_tokens(model, ids, eos=[eos], temperature=0, max_tokens=20, min_tokens=6)
    assert eos not in out.token_ids[:6]
    assert out.token_ids == ref[:len(out.token_ids)] and (out.finish_reason == "length" or ref[-1] in (eos, 0))
    # stop_token_ids behave as extra EOS ids (the token is kept in token_ids), and min_tokens bans them too.
    out = engine_tokens(model, ids, temperature=0, max_tokens=20, stop_token_ids=[eos])
    assert out.token_ids == free[:first + 1] and out.stop_reason == eos
    out = engine_tokens(model, ids, temperature=0, max_tokens=20, stop_token_ids=[eos], min_tokens=6)
    assert out.token_ids == ref[:len(out.token_ids)] and eos not in out.token_ids[:6]


def test_engine_seed_reproducible_and_distinct(model):
    ids = prompt_ids(3)
    kw = dict(temperature=1.5, max_tokens=12)
    a = engine_tokens(model, ids, seed=5, **kw).token_ids
    assert a == engine_tokens(model, ids, seed=5, **kw).token_ids
    assert a != engine_tokens(model, ids, seed=6, **kw).token_ids
    assert a != engine_tokens(model, ids, temperature=0, max_tokens=12).token_ids
