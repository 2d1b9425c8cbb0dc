"""Tool calling through the real server (openai client): the Hermes-style prompt of a full round trip (golden
string), required / named calls that always parse and validate (constrained decoding), auto, streaming deltas,
and bad tool requests. Uses the servers of test_server_structured (a tiny random model and the demo model)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from qwen2vl.processing.processor import Qwen2VLProcessor
from qwen2vl.server import protocol as P
from qwen2vl.server import tools
from test_server import NAME
from test_server_structured import client  # noqa: F401  (module-scoped servers: tiny and demo)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
]
GOLDEN = (
    "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
    "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER) + "\n" + json.dumps(ADD) + "\n</tools>\n\nFor each function call, return a json object "
    "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", "
    "\"unit\": \"C\"}}\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\nsunny\n"
    "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_round_trip_prompt_is_the_hermes_format():
    req = P.ChatCompletionRequest.model_validate({"messages": ROUND_TRIP, "tools": TOOLS})
    conv = tools.render(req, [{"role": m["role"], "content": m["content"] or ""} for m in ROUND_TRIP])
    proc = Qwen2VLProcessor.from_pretrained("qwen2vl/demo/model")
    assert proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == GOLDEN
    content, calls = tools.parse('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                 '</tool_call>\n<tool_call>\nnot json\n</tool_call>')
    assert content == "Let me check." and [c["function"] for c in calls] == [
        {"name": "add", "arguments": '{"a": 1, "b": 2}'}]


def test_stream_parser_sends_each_call_when_its_block_closes():
    text = ('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>')
    parser, content, seen = tools.StreamParser(), "", []
    for i, ch in enumerate(text):
        piece, calls = parser.feed(ch)
        content += piece
        seen += [(i, c["index"], c["function"]["arguments"]) for c in calls]
        assert "<" not in content  # a partial <tool_call> tag is never sent as content
    assert content == "Sure.\n" and parser.finish() == ("", [])
    first_close = text.index("</tool_call>") + len("</tool_call>") - 1
    assert seen == [(first_close, 0, '{"a": 1, "b": 2}'), (len(text) - 1, 1, '{"a": 3, "b": 4}')]
    assert tools.stream_delta(tools.StreamParser(), "no calls", "stop") == ({"content": "no calls"}, "stop")


def call(client, **kw):  # noqa: F811
    kw.setdefault("max_tokens", 150)
    return client.chat.completions.create(model=NAME, messages=ROUND_TRIP[:1], tools=TOOLS, **kw).choices[0]


def valid(tool_call, name=None):
    assert name is None or tool_call.function.name == name
    jsonschema.validate(json.loads(tool_call.function.arguments), SCHEMAS[tool_call.function.name])


def test_required_and_named_calls_validate(client):  # noqa: F811
    for temperature in (0, 1.0):
        r = call(client, temperature=temperature, seed=3, tool_choice="required", parallel_tool_calls=False)
        assert r.finish_reason == "tool_calls" and r.message.content is None and len(r.message.tool_calls) == 1
        valid(r.message.tool_calls[0])
        named = call(client, temperature=temperature, tool_choice={"type": "function", "function": {"name": "add"}})
        assert named.finish_reason == "tool_calls"
        valid(named.message.tool_calls[0], "add")
    stream = client.chat.completions.create(model=NAME, messages=ROUND_TRIP[:1], tools=TOOLS, max_tokens=150,
                                            temperature=0, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [c.choices[0] for c in stream if c.choices]
    streamed = [tc for c in chunks if c.delta.tool_calls for tc in c.delta.tool_calls]
    assert len(streamed) == 1 and chunks[-1].finish_reason == "tool_calls"
    valid(streamed[0], "get_weather")
    auto = call(client, temperature=0)  # text or a call, never a raw <tool_call> block left in the content
    assert auto.message.tool_calls or "<tool_call>" not in (auto.message.content or "")
    none = call(client, temperature=0, tool_choice="none", max_tokens=8)
    assert not none.message.tool_calls


@pytest.mark.parametrize("extra, message", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "not in `tools`"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "Only one structured-output"),
])
def test_bad_tool_requests_get_400(client, extra, message):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as err:
        call(client, **extra)
    assert message in err.value.body["message"]
