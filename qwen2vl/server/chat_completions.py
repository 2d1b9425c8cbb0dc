"""Chat completions: request → sampling params + processed prompt → engine → JSON or SSE stream.

Stages of one request (each counted in `Stages`, shown by `/health` and `/metrics`): receiving the body (app.py),
admission (429 past `max_queue`), media planning (checks only), fetching remote media (async, on the event
loop), preprocessing (processing threads: media decoding, chat template, tokenization), the engine.

Streaming sends one `chat.completion.chunk` per new text delta and choice (first a role chunk per choice), the
finish reason on the choice's last chunk, an optional usage chunk (`stream_options.include_usage`) and
`data: [DONE]`. A client that disconnects aborts its request in the engine. When the server is stopped past its
shutdown timeout (`Lifecycle.stopped`), non-streamed requests get a JSON 503 and streams an error event and
`[DONE]`. Errors: bad input 400; out of memory 503 "overloaded"; anything else 500 with the request id (the
traceback is logged, never sent); messages never carry server paths.
Structured output (`response_format`, `guided_*`) becomes a SamplingParams constraint (`structured.py`), tools
are rendered into the conversation and parsed back out of the text (`tools.py`), and `logprobs` are rendered
in the OpenAI shape (`logprobs.py`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..engine import AsyncEngine, SamplingParams
from ..processing.media import MediaError
from ..engine.sequence import EngineDead, EngineError, QueueFull, RequestRejected
from . import protocol as P
from .media_policy import fetch_remote, load_media, plan_media
from .metrics import RequestClock
from .logprobs import openai_logprobs
from . import tools
from .structured import constraint_kwargs

logger = logging.getLogger("qwen2vl.server")
_DISCONNECT_POLL_S = 0.25
_PATH = re.compile(r"(?<![\w:/.])(?:/[\w.@+-]+){2,}/?")  # absolute file paths (not URLs)
_OOM = ("out of memory", "can't allocate memory", "cannot allocate memory")


class _Stopped(Exception):
    """The server's shutdown timeout passed while this request was in flight."""


class _SSEResponse(StreamingResponse):
    """Closes the body generator whatever ends the response (its `finally` aborts an unfinished request)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def scrub(message: str) -> str:
    """One line, bounded, without server file paths."""
    msg = _PATH.sub("<path>", message.splitlines()[0] if message else "")
    return msg[:500] + "..." if len(msg) > 500 else msg


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _OOM))


def internal_error(e: BaseException, rid: str, where: str) -> P.APIError:
    """Unexpected failure → logged with its traceback; the client gets 503 (OOM) or 500 naming the request id."""
    if is_oom(e):
        logger.error("request %s ran out of memory %s: %s", rid, where, type(e).__name__)
        return P.overloaded(f"The server is overloaded (out of memory) and could not serve request {rid}; "
                            "retry later or send a smaller request.")
    logger.error("request %s failed %s", rid, where, exc_info=e)
    return P.APIError(500, f"Internal server error (request id {rid}).", "internal_server_error")


def engine_error(e: BaseException, rid: str) -> P.APIError:
    if isinstance(e, RequestRejected):
        code = "context_length_exceeded" if "context length" in str(e) else None
        return P.bad_request(scrub(str(e)), "messages" if code else None, code)
    if isinstance(e, QueueFull):
        return P.APIError(429, str(e), "rate_limit_error", None, "queue_full", {"Retry-After": "1"})
    if isinstance(e, EngineDead):
        return P.APIError(503, str(e), "service_unavailable", None, "engine_unavailable")
    return internal_error(e, rid, "inside the engine")


async def _until_stopped(aiter, stopped: asyncio.Event):
    """Items of `aiter` until it ends, or raise _Stopped as soon as `stopped` is set."""
    it = aiter.__aiter__()
    stop = asyncio.ensure_future(stopped.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                raise _Stopped
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        stop.cancel()


class ChatHandler:
    def __init__(self, engine: AsyncEngine, settings, stages, lifecycle, fetcher, metrics=None):
        self.engine, self.settings, self.stages, self.lifecycle = engine, settings, stages, lifecycle
        self.fetcher, self.metrics = fetcher, metrics

    def sampling_params(self, req: P.ChatCompletionRequest) -> SamplingParams:
        d = dict(self.settings.default_sampling)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed"):
            v = getattr(req, name)
            if v is not None:
                d[name] = v
        vocab = self.engine.engine.vocab_size
        bad = [t for t in req.stop_token_ids or () if not 0 <= t < vocab]
        if bad:
            raise P.bad_request(f"stop_token_ids must be token ids in [0, {vocab}), got {bad[0]}.", "stop_token_ids")
        if isinstance(d.get("top_k"), int) and vocab <= d["top_k"] < 2**31:
            d["top_k"] = 0  # keeping at least the whole vocabulary is no filter at all
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

    def _load_media(self, req, conv, items):  # processing thread
        """Media loaded under the token budget, tools rendered: the conversation to process, and its limits."""
        eng = self.engine
        limits = load_media(conv, items, self.settings.media, eng.processor, eng.max_model_len)
        return tools.render(req, conv), limits  # tool definitions, calls and results in Qwen's Hermes format

    async def _prepare(self, req: P.ChatCompletionRequest, rid: str):
        """Admitted request → ProcessedPrompt (fetching, then preprocessing on the processing threads)."""
        eng = self.engine.engine
        conv, items = plan_media(req.messages, self.settings.media, eng.max_model_len)
        with self.stages.stage("fetching"):
            await fetch_remote(items, self.settings.media, self.fetcher)
        with self.stages.stage("preprocessing"):
            try:
                conv, limits = await self.engine.run_in_pool(self._load_media, req, conv, items)
                # processing, then the vision tower, off the step thread: running streams keep going
                return await self.engine.process({"messages": conv}, media_limits=limits)
            except P.APIError:
                raise
            except (ValueError, TypeError, OSError) as e:  # media / processor validation (MediaError: ValueError)
                if is_oom(e):
                    raise internal_error(e, rid, "in preprocessing") from None
                code = "invalid_video" if isinstance(e, MediaError) else None  # images fail earlier, in load_media
                raise P.bad_request(scrub(str(e) or type(e).__name__), "messages", code) from None
            except RuntimeError as e:
                if "after shutdown" in str(e):  # the processing pool is closed: the engine is stopping
                    raise P.shutting_down() from None
                raise internal_error(e, rid, "in preprocessing") from None
            except MemoryError as e:
                raise internal_error(e, rid, "in preprocessing") from None

    async def __call__(self, request: Request, body: dict, start: float) -> Response:
        rid_http = request.scope.get("state", {}).get("request_id", "")
        try:
            req = P.ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise P.bad_request(*P.validation_message(e)) from None
        s = self.settings
        if req.model is not None and req.model not in (s.served_model_name, *s.model_aliases, *s.lora_names):
            raise P.APIError(404, f"The model `{req.model}` does not exist.", "not_found_error", "model",
                             "model_not_found")
        lora = req.model if req.model in s.lora_names else None  # names are checked first: no path from a request
        model_name = lora or s.served_model_name
        params = self.sampling_params(req)
        self.stages.admit()
        rid = req.request_id or P.completion_id()
        prepare = asyncio.ensure_future(self._prepare(req, rid_http or rid))
        stop = asyncio.ensure_future(self.lifecycle.stopped.wait())
        try:
            await asyncio.wait({prepare, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not prepare.done():
            prepare.cancel()
            raise P.shutting_down()
        prompt = prepare.result()
        try:
            stream = self.engine.submit(prompt, params, rid, lora)
        except (EngineError, ValueError) as e:
            raise engine_error(e, rid) if isinstance(e, EngineError) else P.bad_request(str(e)) from None
        clock = RequestClock(self.metrics, start)
        created, n_prompt = P.now(), len(prompt.token_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            parsers = [tools.StreamParser() for _ in range(req.n)] if tools.active(req) else None
            return _SSEResponse(self._stream(stream, rid, created, req.n, n_prompt, include_usage, clock, parsers,
                                             model_name),
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        final = await self._collect(stream, request, rid, clock)
        if final is None:  # client went away
            return Response(status_code=499)
        clock.finish(n_prompt)
        choices = [P.chat_choice(c.index, c.text, c.finish_reason, c.stop_reason) for c in final.outputs]
        for choice, c in zip(choices, final.outputs):
            choice["logprobs"] = openai_logprobs(self.engine.engine.tokenizer, c.token_ids, c.logprobs)
            if tools.active(req):
                tools.apply_to_choice(choice, c.text)
        return JSONResponse(P.chat_response(rid, created, model_name, choices,
                                            P.usage(n_prompt, final.num_output_tokens, final.num_cached_tokens)))

    async def _collect(self, stream, request: Request, rid: str, clock: RequestClock):
        last, seen = None, 0

        async def consume():
            nonlocal last, seen
            async for out in _until_stopped(stream, self.lifecycle.stopped):
                clock.token(out.num_output_tokens - seen)
                seen, last = out.num_output_tokens, out

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
            except _Stopped:
                self.engine.abort(rid)
                raise P.shutting_down() from None
            except Exception as e:
                raise engine_error(e, rid) from None
            return last
        finally:
            if not task.done():
                task.cancel()
                self.engine.abort(rid)

    async def _stream(self, stream, rid, created, n, n_prompt, include_usage, clock: RequestClock, parsers=None,
                      model: str | None = None):
        model = model or self.settings.served_model_name
        done = [False] * n
        n_out = n_cached = 0
        try:
            for i in range(n):
                yield _sse(P.chunk(rid, created, model, [P.chunk_choice(i, {"role": "assistant", "content": ""})]))
            async for out in _until_stopped(stream, self.lifecycle.stopped):
                clock.token(out.num_output_tokens - n_out)
                n_out, n_cached = out.num_output_tokens, out.num_cached_tokens
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
            clock.finish(n_prompt)
            if include_usage:
                yield _sse(P.chunk(rid, created, model, [], P.usage(n_prompt, n_out, n_cached)))
        except _Stopped:  # headers are sent: report in-band, as OpenAI does
            yield _sse(P.shutting_down().body())
        except Exception as e:
            yield _sse(engine_error(e, rid).body())
        finally:
            if not all(done):
                self.engine.abort(rid)
        yield "data: [DONE]\n\n"
