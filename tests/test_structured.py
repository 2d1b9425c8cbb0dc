"""Structured output in the engine and in generate(): llguidance masks per row of a continuous batch (JSON schema,
regex, choice, Lark grammar), greedy and sampled, next to unconstrained rows that stay identical to running alone;
truncation (finish_reason length) and stop strings; bad constraints rejected with the library's message; the
logits-processor form for generate(). Tiny random checkpoint with the demo tokenizer (test_engine)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qwen2vl.engine import LLM, RequestRejected, SamplingParams
from qwen2vl.generation.processors import GrammarLogitsProcessor
from schemas import SCHEMAS, check
from test_engine import build_model_dir

CONV = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured")
    build_model_dir(str(path))
    return LLM(str(path), max_num_seqs=16, max_model_len=1024)


def chat(llm, params):
    return [o.outputs[0] for o in llm.chat([CONV] * len(params), params, use_tqdm=False)]


def test_schemas_batched_with_unconstrained_rows(llm):
    free = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, seed=5, max_tokens=24)]
    alone = [c.token_ids for c in chat(llm, free)]
    schemas = list(SCHEMAS.values())
    params = ([SamplingParams(temperature=0, max_tokens=300, json_schema=s) for s in schemas]
              + [SamplingParams(temperature=0.9, seed=i, max_tokens=300, json_schema=s) for i, s in enumerate(schemas)])
    outs = chat(llm, free[:1] + params + free[1:])
    assert [outs[0].token_ids, outs[-1].token_ids] == alone  # masks touch only their own rows
    for c, s in zip(outs[1:-1], schemas + schemas):
        assert c.finish_reason == "stop", c.text
        check(c.text, s)
    # the mask really constrains: the same greedy request without a schema does not produce this JSON
    assert outs[1].text != chat(llm, [SamplingParams(temperature=0, max_tokens=300)])[0].text


def test_regex_choice_grammar_json_string(llm):
    grammar = 'start: "size=" NUM "px"\nNUM: /[1-9][0-9]?/'
    params = [SamplingParams(temperature=0, max_tokens=30, regex=r"[A-Z]{2}-[0-9]{3}"),
              SamplingParams(temperature=1.0, seed=1, max_tokens=30, choice=["circle", "square", "red triangle"]),
              SamplingParams(temperature=0, max_tokens=30, grammar=grammar),
              SamplingParams(temperature=0, max_tokens=300, json_schema=json.dumps(SCHEMAS["enum_shape"]), n=2)]
    outs = llm.chat([CONV] * len(params), params, use_tqdm=False)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", outs[0].outputs[0].text)
    assert outs[1].outputs[0].text in ("circle", "square", "red triangle")
    assert re.fullmatch(r"size=[1-9][0-9]?px", outs[2].outputs[0].text)
    for c in outs[3].outputs:
        check(c.text, SCHEMAS["enum_shape"])


def test_truncation_is_length_and_stop_strings_apply(llm):
    schema = SCHEMAS["receipt_defs"]
    cut = chat(llm, [SamplingParams(temperature=0, max_tokens=10, json_schema=schema)])[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 10
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)
    stopped = chat(llm, [SamplingParams(temperature=0, max_tokens=300, json_schema=schema, stop=['"tax"'])])[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"tax"'
    assert stopped.text.startswith('{"subtotal": {') and '"tax"' not in stopped.text


@pytest.mark.parametrize("params, message", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "strng"}}}), "Invalid type: strng"),
    (dict(json_schema={"type": "object", "dependentSchemas": {}}), 'Unimplemented keys: ["dependentSchemas"]'),
    (dict(json_schema="{not json"), "Invalid json_schema"),
    (dict(regex="[a-"), "unclosed character class"),
    (dict(choice=[]), "non-empty list"),
    (dict(regex="a", choice=["a"]), "Only one of"),
])
def test_bad_constraints_are_rejected(llm, params, message):
    with pytest.raises(RequestRejected, match=re.escape(message)):
        llm.chat(CONV, SamplingParams(**params), use_tqdm=False)


def test_generate_logits_processor_matches_engine(llm):
    schema = SCHEMAS["ui_element"]
    tok = llm.get_tokenizer()
    prompt = llm.processor.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt)])
    eos = sorted(llm.engine.eos_ids)
    out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, eos_token_id=eos,
                             logits_processor=[GrammarLogitsProcessor(tok, json_schema=schema, eos_token_id=eos)])
    engine = chat(llm, [SamplingParams(temperature=0, max_tokens=300, json_schema=schema)])[0]
    new = out[0, ids.shape[1]:].tolist()
    assert new[:len(engine.token_ids)] == engine.token_ids  # same masks, same greedy tokens (then EOS)
    sampled = llm.model.generate(ids.repeat(2, 1), max_new_tokens=300, do_sample=True, seed=0, eos_token_id=eos,
                                 num_return_sequences=2,
                                 logits_processor=GrammarLogitsProcessor(tok, regex=r"[0-9]{4}", eos_token_id=eos))
    for row in sampled:
        assert re.fullmatch(r"[0-9]{4}", tok.decode(row[ids.shape[1]:], skip_special_tokens=True))
    with pytest.raises(ValueError, match="needs one of"):
        GrammarLogitsProcessor(tok)


def test_logprobs_equal_log_softmax_of_generate_logits(llm):
    tok = llm.get_tokenizer()
    prompt = llm.processor.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt)])
    greedy, sampled = chat(llm, [SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True),
                                 SamplingParams(temperature=1.5, top_k=3, seed=2, max_tokens=12, logprobs=0,
                                                repetition_penalty=1.3)])
    out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             return_dict_in_generate=True, output_logits=True)
    assert out.sequences[0, ids.shape[1]:].tolist() == greedy.token_ids
    for step, entry in enumerate(greedy.logprobs):
        ref = torch.log_softmax(out.logits[step][0], -1)
        top = ref.topk(5)
        assert abs(entry.logprob - ref[greedy.token_ids[step]].item()) <= 1e-4
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(entry.top, top.values.tolist())) <= 1e-4
        assert entry.top[0][1] == pytest.approx(entry.logprob)  # greedy: the sampled token is the top one
        lps = [lp for _, lp in entry.top]
        assert lps == sorted(lps, reverse=True) and sum(math.exp(x) for x in lps) <= 1 + 1e-5
    # sampled with temperature / top_k / penalty: still the raw model distribution (teacher-forced reference)
    full = torch.cat([ids, torch.tensor([sampled.token_ids])], 1)
    with torch.no_grad():
        logits = llm.model(input_ids=full).logits[0, ids.shape[1] - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(sampled.token_ids)[:, None])[:, 0]
    assert [e.top for e in sampled.logprobs] == [[]] * 12
    assert torch.allclose(torch.tensor([e.logprob for e in sampled.logprobs]), ref, atol=1e-4)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
