"""Structured output in chat completions: OpenAI `response_format` and vLLM's `guided_*` extras → the one
constraint `SamplingParams` takes (`json_schema` / `regex` / `choice` / `grammar`, see `qwen2vl.guided_decoding`).

- `{"type": "json_object"}` → any JSON object; `{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}` → that schema. With `strict: true` every object schema that does not say otherwise gets
  `additionalProperties: false` (OpenAI's strict mode: only the declared keys appear).
- `guided_json` (schema), `guided_regex`, `guided_choice` (list of strings), `guided_grammar` (Lark or GBNF).
- tool_choice "required" / a named function: the tool-call grammar of `server/tools.py`.
At most one may be given. The constraint is compiled here, so a bad one is a 400 with llguidance's message (an
unsupported JSON-Schema keyword is named: 'Unimplemented keys: ["..."]') before any prompt processing.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

from .. import guided_decoding as guided
from . import protocol as P
from . import tools


def strict_schema(schema):
    """A copy of `schema` where every object schema without `additionalProperties` forbids extra keys."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def requested_constraints(req: P.ChatCompletionRequest) -> dict[str, tuple[str, object]]:
    """{request field: (SamplingParams field, value)} for every structured-output field the request sets."""
    found = {}
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found["response_format"] = ("json_schema", {"type": "object"})
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise P.bad_request("response_format.json_schema.schema is required for type 'json_schema'.",
                                "response_format")
        schema = copy.deepcopy(rf.json_schema.json_schema)
        found["response_format"] = ("json_schema", strict_schema(schema) if rf.json_schema.strict else schema)
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            found[name] = (kind, value)
    tool_grammar = tools.constraint(req)  # tool_choice "required" / named function
    if tool_grammar is not None:
        found["tool_choice"] = ("grammar", tool_grammar)
    return found


def constraint_kwargs(req: P.ChatCompletionRequest) -> dict:
    """The request's constraint as SamplingParams keyword arguments ({} if none); APIError 400 for a bad one."""
    found = requested_constraints(req)
    if not found:
        return {}
    if len(found) > 1:
        raise P.bad_request(f"Only one structured-output constraint may be given, got {', '.join(found)}.",
                            sorted(found)[0])
    (param, (kind, value)), = found.items()
    kwargs = {kind: value}
    try:
        guided.compile_grammar(SimpleNamespace(**{k: kwargs.get(k) for k in guided.CONSTRAINTS}))
    except ValueError as e:
        raise P.bad_request(str(e), param) from None
    return kwargs
