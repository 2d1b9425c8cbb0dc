"""Structured output through the real server with the official `openai` client: `response_format` (json_schema
with/without strict, json_object) and vLLM's guided_regex / guided_choice / guided_grammar, streamed and not,
batched with unconstrained requests that stay identical to running alone; bad constraints → 400 with the
library's message. On a tiny random checkpoint and on the bundled demo model."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from qwen2vl.server import ServerThread, build_engine, create_app, settings_from
from schemas import SCHEMAS, check
from test_engine import build_model_dir
from test_server import NAME, args_for

MSG = [{"role": "user", "content": "Describe the picture as JSON."}]


def start(model_dir):
    args = args_for(model_dir, None, "--max-model-len", "1024")
    engine = build_engine(args)
    server = ServerThread(create_app(engine, settings_from(args, engine))).start()
    return server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module", params=["tiny", "demo"])
def client(request, tmp_path_factory):
    model_dir = "qwen2vl-demo"
    if request.param == "tiny":
        model_dir = tmp_path_factory.mktemp("srv-structured")
        build_model_dir(str(model_dir))
    server, cl = start(model_dir)
    yield cl
    server.stop()


def ask(client, **kw):
    kw.setdefault("max_tokens", 300)
    return client.chat.completions.create(model=NAME, messages=MSG, **kw).choices[0]


def test_schemas_greedy_and_sampled_batched_with_free_requests(client):
    free = [dict(temperature=0, max_tokens=20), dict(temperature=1.0, seed=7, max_tokens=20)]
    alone = [ask(client, **f).message.content for f in free]
    jobs = [dict(temperature=t, seed=i, response_format={"type": "json_schema", "json_schema": {
        "name": name, "schema": schema, "strict": i % 2 == 0}})
        for t in (0, 0.8) for i, (name, schema) in enumerate(SCHEMAS.items())]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, client, **j) for j in jobs[:4] + free + jobs[4:]]
        results = [f.result() for f in futures]
    assert [r.message.content for r in results[4:6]] == alone
    for r, job in zip(results[:4] + results[6:], jobs):
        assert r.finish_reason == "stop", r.message.content
        check(r.message.content, job["response_format"]["json_schema"]["schema"])


def test_stream_extras_and_truncation(client):
    schema = SCHEMAS["nested"]
    stream = client.chat.completions.create(model=NAME, messages=MSG, max_tokens=300, temperature=0, stream=True,
                                            extra_body={"guided_json": schema})
    chunks = [c.choices[0] for c in stream if c.choices]
    check("".join(c.delta.content or "" for c in chunks), schema)
    assert chunks[-1].finish_reason == "stop"
    assert re.fullmatch(r"[A-Z][a-z]{2,5}", ask(client, temperature=0, extra_body={
        "guided_regex": "[A-Z][a-z]{2,5}"}).message.content)
    assert ask(client, temperature=1, extra_body={"guided_choice": ["yes", "no"]}).message.content in ("yes", "no")
    assert re.fullmatch(r"\(\d, \d\)", ask(client, temperature=0, extra_body={
        "guided_grammar": 'start: "(" D ", " D ")"\nD: /[0-9]/'}).message.content)
    cut = ask(client, temperature=0, max_tokens=8, response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": SCHEMAS["receipt_defs"]}})
    assert cut.finish_reason == "length"


def test_json_object(client):
    r = ask(client, temperature=0, max_tokens=400, response_format={"type": "json_object"})
    if r.finish_reason == "stop":  # a random model may write an endless object; the demo model closes it
        assert isinstance(json.loads(r.message.content), dict)
    else:
        assert r.finish_reason == "length" and r.message.content.startswith("{")


@pytest.mark.parametrize("extra, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}), "Invalid type: strng"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentSchemas": {}}}}), 'Unimplemented keys: ["dependentSchemas"]'),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "schema is required"),
    (dict(extra_body={"guided_regex": "(", "guided_choice": ["a"]}), "Only one structured-output constraint"),
    (dict(extra_body={"guided_regex": "(ab"}), "Invalid regex"),
])
def test_bad_constraints_get_400(client, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, **extra)
    assert message in err.value.body["message"]


def test_logprobs_shape_stream_and_errors(client):
    kw = dict(model=NAME, messages=MSG, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw).choices[0]
    content = r.logprobs.content
    assert len(content) == 10 or r.finish_reason == "stop"
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace").startswith(r.message.content)
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob == pytest.approx(tops[0])
        assert t.token == t.top_logprobs[0].token and t.logprob <= 0
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs]
    flat = [t for lp in streamed for t in lp.content]
    assert [(t.token, round(t.logprob, 4)) for t in flat] == [(t.token, round(t.logprob, 4)) for t in content]
    assert client.chat.completions.create(model=NAME, messages=MSG, max_tokens=2).choices[0].logprobs is None
    for bad in (dict(logprobs=True, top_logprobs=21), dict(top_logprobs=2)):
        with pytest.raises(openai.BadRequestError, match="top_logprobs"):
            client.chat.completions.create(model=NAME, messages=MSG, max_tokens=2, **bad)
