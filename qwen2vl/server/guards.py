"""The server's front door: one ASGI middleware that runs before any route, plus per-request stage accounting.

`Guard` (in this order, each answering the OpenAI error JSON):
* a request id for every request (`X-Request-Id` on the response; 500 messages name it);
* while shutting down, new requests get 503 (`/health` still answers, saying so);
* `Host` must be one of `allowed_hosts` (DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends
  `Host: evil.example`) → 400;
* a POST's `Content-Type` must be `application/json` → else 415: a cross-site page can send `text/plain` or
  form bodies without a CORS preflight, never `application/json`;
* at most `max_connections` requests in flight (streams included) → 503 with `Retry-After`.
It also counts responses by status for `/metrics`.

`Stages` counts in-flight requests per stage (receiving the body, fetching media, preprocessing); `admit` is
the single admission rule: fetching + preprocessing + waiting in the engine must stay under `max_queue` from the
moment a body is accepted, else 429 with `Retry-After`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import uuid
from contextlib import contextmanager

from starlette.responses import JSONResponse

from .protocol import APIError, bad_request, error_body

UNGUARDED = ("/health",)  # always answers (load balancers), never counted against the connection cap


def host_name(value: str) -> str:
    """`Host` header → lower-case host without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def default_allowed_hosts(bound: str) -> tuple[str, ...] | None:
    """The bound host's names, plus every localhost form when bound to loopback; None (any) for a wildcard
    bind, whose names the server cannot know (set --allowed-hosts there)."""
    if bound in ("", "0.0.0.0", "::"):
        return None
    try:
        loopback = ipaddress.ip_address(bound).is_loopback
    except ValueError:
        loopback = bound.lower() == "localhost"
    names = {bound.lower()}
    if loopback:
        names |= {"localhost", "127.0.0.1", "::1"}
    return tuple(sorted(names))


class Lifecycle:
    """Shutdown state shared by the guard and the handlers."""

    def __init__(self):
        self.draining = False  # stop taking new requests
        self.stopped = asyncio.Event()  # past the shutdown timeout: in-flight requests end with 503 / error event
        self.in_flight = 0

    async def stop(self, timeout: float, poll: float = 0.05) -> None:
        """Let in-flight requests finish for up to `timeout` s, then tell the rest to end now."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(poll)
        self.stopped.set()


def _json(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, None, code), status, headers=headers)


class Guard:
    def __init__(self, app, settings, lifecycle: Lifecycle, metrics=None):
        self.app, self.settings, self.lifecycle, self.metrics = app, settings, lifecycle, metrics
        hosts = settings.allowed_hosts
        self.hosts = None if hosts is None or "*" in hosts else {h.lower().strip("[]") for h in hosts}

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None and host_name(headers.get("host", "")) not in self.hosts:
            return _json(400, "Invalid Host header for this server (see --allowed-hosts).", "invalid_request_error",
                         "invalid_host")
        if self.lifecycle.draining:
            return _json(503, "The server is shutting down.", "service_unavailable", "server_shutting_down",
                         {"Connection": "close"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _json(415, f"Unsupported Content-Type {ctype or '(none)'!r}: send application/json.",
                             "invalid_request_error", "unsupported_media_type")
        if self.lifecycle.in_flight >= self.settings.max_connections:
            return _json(503, f"Too many concurrent requests (at most {self.settings.max_connections}); retry "
                         "later.", "service_unavailable", "too_many_connections", {"Retry-After": "1"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if scope["path"] in UNGUARDED:
                return await self.app(scope, receive, send_with_id)
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send_with_id)
            self.lifecycle.in_flight += 1
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self.lifecycle.in_flight -= 1
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(status=str(status[0])).inc()


class Stages:
    """In-flight request counts per pre-engine stage (touched on the event loop only)."""

    names = ("receiving", "fetching", "preprocessing")

    def __init__(self, engine, max_queue: int | None):
        self.engine, self.max_queue = engine, max_queue
        self.counts = dict.fromkeys(self.names, 0)

    @contextmanager
    def stage(self, name: str):
        self.counts[name] += 1
        try:
            yield
        finally:
            self.counts[name] -= 1

    def queued(self) -> int:
        return self.counts["fetching"] + self.counts["preprocessing"] + self.engine.stats()["waiting"]

    def admit(self) -> None:
        """Call when a body has been accepted, before any work on it (the request then counts as queued)."""
        queued = self.queued()
        if self.max_queue is not None and queued >= self.max_queue:
            raise APIError(429, f"The server is busy: {queued} requests are already queued (max_queue="
                           f"{self.max_queue}). Retry later.", "rate_limit_error", None, "queue_full",
                           {"Retry-After": "1"})

    def snapshot(self) -> dict:
        return {**self.counts, "queued": self.queued()}


async def read_json(request, max_bytes: int, timeout: float) -> dict:
    """The request body as a JSON object: at most `max_bytes` (checked while streaming), read within `timeout`
    seconds (a stalled upload gets 408 and its connection closed), strict JSON (no NaN / Infinity)."""
    declared = request.headers.get("content-length")
    too_big = bad_request(f"Request body too large: the limit is {max_bytes} bytes.", None, "request_too_large")
    if declared and declared.isdigit() and int(declared) > 4 * max_bytes:
        raise too_big
    buf, total = bytearray(), 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                total += len(chunk)
                if total <= max_bytes:
                    buf += chunk
                elif total > 4 * max_bytes:  # stop draining a hostile upload; the connection is closed afterwards
                    break
    except TimeoutError:
        raise APIError(408, f"The request body was not received within {timeout:g} s.", "invalid_request_error",
                       None, "request_timeout", {"Connection": "close"}) from None

    if total > max_bytes:  # drained a little over the cap so that the client reads the answer, not a reset
        raise too_big

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(bytes(buf), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"Malformed JSON body: {e}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("Malformed JSON body: nested too deeply.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    return data
