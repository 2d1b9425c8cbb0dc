"""`AsyncEngine`: the `LLMEngine` step loop on one background thread, driven from asyncio.

* `generate(prompt, params, request_id)` is an async generator of `RequestOutput`s (each carrying the delta since
  the previous one; the last has `finished=True`). Prompt processing (chat template, image decoding/resizing)
  runs in a small thread pool, never on the event loop nor on the step thread.
* Leaving the generator early (client disconnect → task cancelled, `aclose()`, `break`) aborts the request.
* `abort(request_id)`, `shutdown(drain=...)`: the step thread and the processing pool are joined; no thread
  outlives the engine.
All torch work of the model happens on the step thread; other threads only talk to it through a command queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from .llm_engine import LLMEngine
from .sampling_params import SamplingParams
from .sequence import EngineDead, QueueFull, RequestOutput

logger = logging.getLogger("qwen2vl.engine")
_STOP = object()


class _Stream:
    """Hands outputs from the step thread to one consumer on an event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: Any) -> None:  # step thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass


def _yield_to_the_step_thread() -> None:
    """Initializer of the processing threads (media decoding, preprocessing, templating, kernel choices): they run
    at a lower OS priority (Linux: niceness is per thread, and the OpenMP workers they start inherit it), so that on
    a machine with as many cores as the step thread's OpenMP team, a request being prepared does not deschedule a
    team member and stall every barrier of a decode step (each token crosses ~140 of them). (torch's thread count
    is process-wide, so it is not lowered here.)"""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except (AttributeError, OSError):  # not Linux / not permitted: same priority as before
        pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_queue: int | None = None, processing_threads: int = 2):
        self.engine = engine
        self.max_queue = max_queue if max_queue is not None else engine.config.max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet seen by the step thread
        self._accepting = True
        self._dead: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=processing_threads, thread_name_prefix="qwen2vl-inputs",
                                        initializer=_yield_to_the_step_thread)
        self._thread = threading.Thread(target=self._loop, name="qwen2vl-engine", daemon=True)
        self._thread.start()
        self.aborted: list[str] = []  # ids of requests aborted while unfinished (observability / tests)

    # ------------------------------------------------------------------------------------------ public API
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def threads(self) -> list[threading.Thread]:
        """Every thread this engine started (the step thread and the processing pool's workers)."""
        return [self._thread, *getattr(self._pool, "_threads", ())]

    @property
    def processor(self):
        """The processor (or bare tokenizer, or None) the engine prepares prompts with (`LLMEngine.processor`)."""
        return self.engine.processor

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> dict:
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting + self._pending,
                "prefilling": self.engine.num_prefilling, "max_num_seqs": self.engine.pool.max_num_seqs,
                "peak_running": self.engine.peak_running, **self.engine.stats()}

    async def run_in_pool(self, fn, *args):
        """Run CPU-bound request preparation (media decoding, templating) on the processing threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def process(self, prompt, media_limits=None):
        """Run prompt processing in the processing pool; returns a `ProcessedPrompt`."""
        pp = await self.run_in_pool(self.engine.process_prompt, prompt, media_limits)
        await self.run_in_pool(self.engine.encode_media, pp)  # the vision tower runs here, not on the step thread
        return pp

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and enqueue a request now (raises RequestRejected / QueueFull / EngineDead synchronously),
        return the async iterator of its outputs. `prompt` should be a `ProcessedPrompt` (see `process`);
        `lora`: a served adapter's name (None: the base model)."""
        self._check_alive()
        request = self.engine.make_request(prompt, params, request_id, lora)
        with self._lock:
            waiting = self.engine.num_waiting + self._pending
            if self.max_queue is not None and waiting >= self.max_queue:
                raise QueueFull(f"The server is busy: {waiting} requests are already waiting "
                                f"(max_queue={self.max_queue}). Retry later.")
            if request.request_id in self._streams:
                raise ValueError(f"Request id {request.request_id!r} is already in use.")
            stream = _Stream(asyncio.get_running_loop())
            self._streams[request.request_id] = stream
            self._pending += 1
        self._cmds.put(("add", request))
        return self._iterate(request.request_id, stream)

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       media_limits=None, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Process + submit + iterate in one call."""
        pp = await self.process(prompt, media_limits)
        async for out in self.submit(pp, params, request_id, lora):
            yield out

    def abort(self, request_id: str) -> None:
        if self._thread.is_alive():
            self._cmds.put(("abort", request_id))

    def shutdown(self, drain: bool = False, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; with `drain` let running ones finish, else abort them. Joins every thread."""
        self._accepting = False
        if self._thread.is_alive():
            self._cmds.put(("stop", drain))
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def shutdown_async(self, drain: bool = False, timeout: float | None = 30.0) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.shutdown(drain, timeout))

    # ------------------------------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"The engine stopped after an internal error: {type(self._dead).__name__}")
        if not self._accepting or not self._thread.is_alive():
            raise EngineDead("The engine is shutting down.")

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    def _dispatch(self, out: RequestOutput, error: BaseException | None = None) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if error is not None:
            stream.put(error)
        else:
            stream.put(out)
        if out.finished or error is not None:
            with self._lock:
                self._streams.pop(out.request_id, None)

    def _handle(self, cmd) -> bool:
        """Apply one command on the step thread; False means stop the loop."""
        eng = self.engine
        kind = cmd[0]
        if kind == "add":
            request = cmd[1]
            with self._lock:
                self._pending -= 1
            try:
                eng.add_prepared(request)
            except Exception as e:  # duplicate id / queue full at the engine level
                stream = self._streams.pop(request.request_id, None)
                if stream is not None:
                    stream.put(e)
        elif kind == "abort":
            out = eng.abort_request(cmd[1])
            if out is not None:
                self.aborted.append(cmd[1])
                self._dispatch(out)
        elif kind == "stop":
            self._accepting = False
            self._draining = cmd[1]
            return False
        return True

    def _loop(self) -> None:
        eng = self.engine
        self._draining = None
        try:
            while True:
                stop = False
                block = not eng.has_unfinished_requests()
                while True:
                    try:
                        cmd = self._cmds.get(block=block, timeout=None if block else 0)
                    except queue.Empty:
                        break
                    block = False
                    if not self._handle(cmd):
                        stop = True
                        break
                if stop:
                    if self._draining:
                        while eng.has_unfinished_requests():
                            self._step()
                    break
                if eng.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # pragma: no cover - defensive: report, then fail every open stream
            logger.exception("engine loop crashed")
            self._dead = e
        finally:
            self._close_all()

    def _step(self) -> None:
        for out in self.engine.step():
            req_err = getattr(out, "error", None)
            self._dispatch(out, req_err)

    def _close_all(self) -> None:
        eng = self.engine
        for rid in list(eng.scheduler.requests):
            out = eng.abort_request(rid)
            if out is not None:
                self._dispatch(out)
        # drain commands that arrived meanwhile (adds that never reached the scheduler)
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                stream = self._streams.pop(cmd[1].request_id, None)
                if stream is not None:
                    stream.put(EngineDead("The engine is shutting down."))
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.put(EngineDead("The engine is shutting down."))
