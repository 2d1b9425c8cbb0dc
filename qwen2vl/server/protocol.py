"""OpenAI chat-completions wire format (the subset this server implements) and the error JSON shape.

Requests are validated with pydantic; unknown top-level fields are ignored (as OpenAI-compatible servers do),
but known fields must have the right types. Errors are always `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    min_pixels: int | None = Field(default=None, gt=0)  # qwen-vl-utils per-image resize bounds
    max_pixels: int | None = Field(default=None, gt=0)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str
    fps: float | None = Field(default=None, gt=0)
    num_frames: int | None = Field(default=None, gt=0)
    min_pixels: int | None = Field(default=None, gt=0)
    max_pixels: int | None = Field(default=None, gt=0)


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"  # a JSON object, as text (OpenAI)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages (rendered by server/tools.py)
    tool_call_id: str | None = None  # tool messages


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


UNSUPPORTED = ("functions", "function_call")  # the legacy function-calling fields: refused, never ignored


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}` (structured output)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    functions: Any = None  # refused (400): use `tools`
    function_call: Any = None
    user: str | None = None
    request_id: str | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM extras (structured output, see server/structured.py)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences are supported")
        if v == "" or (isinstance(v, list) and any(not s for s in v)):
            raise ValueError("stop sequences must be non-empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        if self.tool_choice not in ("none", "auto") and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs `tools`")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                             "in `tools`")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        for name in UNSUPPORTED:
            if getattr(self, name) is not None:
                raise ValueError(f"`{name}` is not supported by this server (use `tools` / `tool_choice`)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream=true")
        return self


# ---------------------------------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:  # prompt tokens served from the KV prefix cache (OpenAI's field)
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def chat_response(cid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def chat_choice(index: int, text: str, finish_reason: str | None, stop_reason: Any = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason}


def chunk(cid: str, created: int, model: str, choices: list[dict], use: dict | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": use}


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error with its HTTP status, rendered as the OpenAI error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def validation_message(err) -> tuple[str, str | None]:
    """pydantic ValidationError → (one-line message, dotted param path of the first error)."""
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        param = param or loc or None
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more, param


def overloaded(message: str = "The server is overloaded; retry later.", code: str = "overloaded") -> APIError:
    return APIError(503, message, "service_unavailable", None, code, {"Retry-After": "1"})


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", "service_unavailable", None, "server_shutting_down",
                    {"Connection": "close"})
