"""Chat completions: request → sampling params + processed prompt → engine → JSON or SSE stream.

Streaming sends one `chat.completion.chunk` per new text delta and choice (first a role chunk per choice), the
finish reason on the choice's last chunk, an optional usage chunk (`stream_options.include_usage`) and
`data: [DONE]`. A client that disconnects (stream cancelled, or `request.is_disconnected()` while waiting for
a non-streamed answer) aborts its request in the engine.
Structured output (`response_format`, `guided_*`) becomes a SamplingParams constraint (`structured.py`), tools
are rendered into the conversation and parsed back out of the text (`tools.py`), and `logprobs` are rendered
in the OpenAI shape (`logprobs.py`).
"""
from __future__ import annotations

import asyncio
import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..engine import AsyncEngine, SamplingParams
from ..engine.sequence import EngineDead, EngineError, QueueFull, RequestRejected
from . import protocol as P
from .media import as_api_error, to_conversation
from .logprobs import openai_logprobs
from . import tools
from .structured import constraint_kwargs

logger = logging.getLogger("qwen2vl.server")
_DISCONNECT_POLL_S = 0.25


class _SSEResponse(StreamingResponse):
    """Closes the body generator whatever ends the response (its `finally` aborts an unfinished request)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def engine_error(e: Exception) -> P.APIError:
    if isinstance(e, RequestRejected):
        code = "context_length_exceeded" if "context length" in str(e) else None
        return P.bad_request(str(e), "messages" if code else None, code)
    if isinstance(e, QueueFull):
        return P.APIError(429, str(e), "rate_limit_error", None, "queue_full")
    if isinstance(e, EngineDead):
        return P.APIError(503, str(e), "service_unavailable", None, "engine_unavailable")
    logger.error("request failed in the engine: %s: %s", type(e).__name__, e)
    return P.APIError(500, "The request failed inside the engine.", "internal_server_error")


class ChatHandler:
    def __init__(self, engine: AsyncEngine, settings):
        self.engine = engine
        self.settings = settings

    def sampling_params(self, req: P.ChatCompletionRequest) -> SamplingParams:
        d = dict(self.settings.default_sampling)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed"):
            v = getattr(req, name)
            if v is not None:
                d[name] = v
        d.update(constraint_kwargs(req))  # structured output (400 for a bad constraint)
        try:
            return SamplingParams(
                n=req.n, max_tokens=req.max_completion_tokens or req.max_tokens, stop=req.stop,
                stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens,
                logprobs=(req.top_logprobs or 0) if req.logprobs else None, **d)
        except (ValueError, TypeError) as e:
            raise P.bad_request(str(e)) from None

    def _process(self, req):  # processing thread
        conv, limits = to_conversation(req.messages, self.settings.media)
        conv = tools.render(req, conv)  # tool definitions, calls and results in Qwen's Hermes format
        return self.engine.engine.inputs.process({"messages": conv}, media_limits=limits)

    async def __call__(self, request: Request, body: dict) -> Response:
        try:
            req = P.ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise P.bad_request(*P.validation_message(e)) from None
        s = self.settings
        if req.model is not None and req.model not in (s.served_model_name, *s.model_aliases):
            raise P.APIError(404, f"The model `{req.model}` does not exist.", "not_found_error", "model",
                             "model_not_found")
        params = self.sampling_params(req)
        try:
            prompt = await self.engine.run_in_pool(self._process, req)
        except P.APIError:
            raise
        except (ValueError, TypeError, OSError) as e:  # media / processor validation (MediaError is a ValueError)
            raise as_api_error(e) from None
        except RuntimeError as e:  # executor shut down
            raise P.APIError(503, "The server is shutting down.", "service_unavailable") from e
        rid = req.request_id or P.completion_id()
        try:
            stream = self.engine.submit(prompt, params, rid)
        except (EngineError, ValueError) as e:
            raise engine_error(e) if isinstance(e, EngineError) else P.bad_request(str(e)) from None
        model = s.served_model_name
        created = P.now()
        n_prompt = len(prompt.token_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            parsers = [tools.StreamParser() for _ in range(req.n)] if tools.active(req) else None
            return _SSEResponse(self._stream(stream, rid, created, model, req.n, n_prompt, include_usage, parsers),
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        final = await self._collect(stream, request, rid)
        if final is None:  # client went away
            return Response(status_code=499)
        choices = [P.chat_choice(c.index, c.text, c.finish_reason, c.stop_reason) for c in final.outputs]
        for choice, c in zip(choices, final.outputs):
            choice["logprobs"] = openai_logprobs(self.engine.engine.tokenizer, c.token_ids, c.logprobs)
            if tools.active(req):
                tools.apply_to_choice(choice, c.text)
        return JSONResponse(P.chat_response(rid, created, model, choices,
                                            P.usage(n_prompt, final.num_output_tokens)))

    async def _collect(self, stream, request: Request, rid: str):
        last = None

        async def consume():
            nonlocal last
            async for out in stream:
                last = out

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    self.engine.abort(rid)
                    return None
            try:
                task.result()
            except EngineError as e:
                raise engine_error(e) from None
            except Exception as e:
                raise engine_error(e) from None
            return last
        finally:
            if not task.done():
                task.cancel()
                self.engine.abort(rid)

    async def _stream(self, stream, rid, created, model, n, n_prompt, include_usage, parsers=None):
        done = [False] * n
        n_out = 0
        try:
            for i in range(n):
                yield _sse(P.chunk(rid, created, model, [P.chunk_choice(i, {"role": "assistant", "content": ""})]))
            async for out in stream:
                n_out = out.num_output_tokens
                for c in out.outputs:
                    if done[c.index] or not (c.delta_text or c.finish_reason or c.delta_logprobs):
                        continue
                    delta = {"content": c.delta_text} if c.delta_text else {}
                    finish = c.finish_reason
                    if parsers is not None:  # tool calls: content streams until <tool_call>, calls at the end
                        delta, finish = tools.stream_delta(parsers[c.index], c.delta_text, finish)
                    choice = P.chunk_choice(c.index, delta, finish)
                    choice["logprobs"] = openai_logprobs(self.engine.engine.tokenizer, c.delta_token_ids,
                                                         c.delta_logprobs)
                    yield _sse(P.chunk(rid, created, model, [choice]))
                    done[c.index] = c.finish_reason is not None
            if include_usage:
                yield _sse(P.chunk(rid, created, model, [], P.usage(n_prompt, n_out)))
        except (EngineError, Exception) as e:  # headers are sent: report in-band, as OpenAI does
            err = engine_error(e)
            yield _sse(err.body())
        finally:
            if not all(done):
                self.engine.abort(rid)
        yield "data: [DONE]\n\n"
