"""Tool calling in Qwen's Hermes-style function-calling format (the one Qwen2.5's chat templates render).

The Qwen2-VL chat template has no tool section, so the conversation is rewritten before it is rendered:
- the system message gets the `# Tools` section listing every function as JSON inside `<tools></tools>` and
  asking for `<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>`;
- an assistant message with `tool_calls` becomes its text followed by one `<tool_call>` block per call;
- consecutive `role: "tool"` messages become one user message of `<tool_response>` blocks.
The result is exactly what Qwen2.5's template produces for the same history, with Qwen2-VL's default system
prompt. Model output is parsed back: every `<tool_call>` block holding a JSON object with `name` and `arguments`
becomes an OpenAI tool call; the text before the first block is the message content.

`tool_choice`: "none" renders no tools and parses nothing; "auto" (the default with tools) renders and parses;
"required" and a named function also constrain decoding to one (or, with parallel_tool_calls, several) call
blocks whose arguments follow the function's JSON schema, so the call always parses and validates.
"""
from __future__ import annotations

import json
import re
import uuid

from . import protocol as P

DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_HEADER = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def active(req: P.ChatCompletionRequest) -> bool:
    """Tools are rendered and the output parsed."""
    return bool(req.tools) and req.tool_choice != "none"


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p["text"] for p in content if p.get("type") == "text")


def _call_block(call) -> str:
    try:
        args = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
    except json.JSONDecodeError:
        raise P.bad_request(f"tool call {call.function.name!r}: arguments must be a JSON object string.",
                            "messages") from None
    return f'{CALL_OPEN}\n{json.dumps({"name": call.function.name, "arguments": args}, ensure_ascii=False)}\n' \
           f'{CALL_CLOSE}'


def render(req: P.ChatCompletionRequest, conv: list[dict]) -> list[dict]:
    """The HF-style conversation of `req.messages` (one entry per message) in the Hermes tool format."""
    out: list[dict] = []
    for msg, entry in zip(req.messages, conv):
        if msg.role == "tool":
            block = f"<tool_response>\n{_text(entry['content'])}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        elif msg.role == "assistant" and msg.tool_calls:
            text = _text(entry["content"])
            blocks = "\n".join(_call_block(c) for c in msg.tool_calls)
            out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        else:
            out.append(dict(entry))
    for entry in out:
        entry.pop("_tool", None)
    if active(req):
        section = TOOLS_HEADER + "".join("\n" + json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False)
                                         for t in req.tools) + TOOLS_FOOTER
        if out and out[0]["role"] == "system":
            first = out[0]
            if isinstance(first["content"], str):
                first["content"] += section
            else:
                first["content"] = [*first["content"], {"type": "text", "text": section}]
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + section})
    return out


def constraint(req: P.ChatCompletionRequest) -> str | None:
    """A Lark grammar (llguidance) for tool_choice "required" / a named function, else None."""
    if not active(req) or req.tool_choice == "auto":
        return None
    tools = req.tools
    if req.tool_choice != "required":
        tools = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
    options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                  "arguments": t.function.parameters or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = {"anyOf": options, "x-guidance": _JSON_STYLE}
    repeat = ' ("\\n" call)*' if req.tool_choice == "required" and req.parallel_tool_calls is not False else ""
    return (f"start: call{repeat}\ncall: {json.dumps(CALL_OPEN + chr(10))} body {json.dumps(chr(10) + CALL_CLOSE)}"
            f"\nbody: %json {json.dumps(schema)}")


def parse(text: str) -> tuple[str | None, list[dict]]:
    """Model output → (content before the first call or None, OpenAI tool_calls). Blocks that are not a JSON
    object with a string `name` stay in the content."""
    calls, first = [], None
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            continue
        first = m.start() if first is None else first
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}})
    if not calls:
        return text, []
    content = text[:first].strip()
    return content or None, calls


def apply_to_choice(choice: dict, text: str) -> None:
    """Put the parsed calls into a non-streamed choice (finish_reason "tool_calls" when there are calls)."""
    content, calls = parse(text)
    if calls:
        choice["message"]["content"] = content
        choice["message"]["tool_calls"] = calls
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"


class StreamParser:
    """One streamed choice: content is sent as it comes up to the first `<tool_call>` (a possible partial tag is
    held back); after it, each call is sent as soon as its block closes. `feed(delta) -> (content, new calls)`,
    `finish() -> (content, remaining calls)`; calls carry their OpenAI `index`."""

    def __init__(self):
        self.pending = ""
        self.in_calls = False
        self.tail = ""
        self.sent = 0  # calls sent so far

    def _content(self, delta: str) -> str:
        if self.in_calls:
            self.tail += delta
            return ""
        self.pending += delta
        at = self.pending.find(CALL_OPEN)
        if at >= 0:
            self.in_calls, self.tail = True, self.pending[at:]
            out, self.pending = self.pending[:at], ""
            return out
        keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self.pending)), 0, -1)
                     if CALL_OPEN.startswith(self.pending[-k:])), 0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def _new_calls(self, calls: list[dict]) -> list[dict]:
        new = [{"index": self.sent + i, **c} for i, c in enumerate(calls[self.sent:])]
        self.sent += len(new)
        return new

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        content = self._content(delta)
        return content, self._new_calls(parse(self.tail)[1]) if self.in_calls else []

    def finish(self) -> tuple[str, list[dict]]:
        _, calls = parse(self.tail)
        if not calls:
            return self.pending + self.tail, []
        return self.pending, self._new_calls(calls)


def stream_delta(parser: StreamParser, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """One streamed step of a choice → (delta, finish_reason); the last chunk's finish_reason is "tool_calls"
    when calls were sent."""
    content, calls = parser.feed(text)
    if finish_reason is not None:
        rest, more = parser.finish()
        content, calls = content + rest, calls + more
    delta: dict = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = calls
    if finish_reason == "stop" and parser.sent:
        finish_reason = "tool_calls"
    return delta, finish_reason
