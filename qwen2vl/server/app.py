"""FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`, and the chat page at
`GET /` (web_ui.py).

`create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI`. Every error leaves as the OpenAI error JSON
with its status (400 bad input, 401 bad key, 404 unknown model/route, 408 body too slow, 415 not JSON, 429 queue
full, 503 overloaded / shutting down / too many connections, 500 generic with the request id: tracebacks are
logged, never sent). `guards.Guard` runs before every route (Host, Content-Type, connection cap, shutdown);
CORS is off unless `allowed_origins` is set. `app.state.lifecycle.stop(timeout)` (called by the launcher when
uvicorn begins its shutdown) lets in-flight requests finish, then ends the rest; the engine is shut down when
the app's lifespan ends.
"""
from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import AsyncEngine
from .fetch import MediaFetcher
from .guards import Guard, Lifecycle, Stages, read_json
from .media_policy import MediaPolicy
from .metrics import Metrics
from .protocol import APIError, error_body, now
from .chat_completions import ChatHandler, internal_error
from .web_ui import mount_web_ui

logger = logging.getLogger("qwen2vl.server")


@dataclass
class ServerSettings:
    served_model_name: str = "qwen2vl-demo"
    model_aliases: tuple[str, ...] = ()  # other names accepted in `model` (e.g. the path it was loaded from)
    lora_names: tuple[str, ...] = ()  # served LoRA adapters (--lora-modules), selected by `model`
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_request_bytes: int = 32 * 1024**2
    default_sampling: dict = field(default_factory=dict)  # from generation_config.json
    drain_on_shutdown: bool = False
    allowed_hosts: tuple[str, ...] | None = ("localhost", "127.0.0.1", "::1")  # None: any Host
    allowed_origins: tuple[str, ...] = ()  # CORS off when empty
    max_connections: int = 64  # requests in flight (streams included)
    body_timeout: float = 30.0  # seconds to receive a request body
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    max_queue: int | None = None  # None: the engine's
    web_ui: bool = True  # the chat page at `/` (web_ui.py)


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown_async(drain=settings.drain_on_shutdown)

    app = FastAPI(title="qwen2vl OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    lifecycle = Lifecycle()
    stages = Stages(engine, settings.max_queue if settings.max_queue is not None else engine.max_queue)
    metrics = Metrics(engine, stages)
    app.state.engine, app.state.settings, app.state.lifecycle = engine, settings, lifecycle
    app.state.stages, app.state.metrics = stages, metrics
    chat = ChatHandler(engine, settings, stages, lifecycle, MediaFetcher(settings.media.fetch), metrics)
    created = now()
    if settings.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, settings=settings, lifecycle=lifecycle, metrics=metrics)  # outermost

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                           "authentication_error", None, "invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = dict(exc.headers or {})
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(f"Invalid request: {exc.errors()[:3]}", "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        err = internal_error(exc, request.scope.get("state", {}).get("request_id", "?"),
                             f"in {request.method} {request.url.path}")
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.get("/health")
    async def health():
        stats = {**engine.stats(), **stages.snapshot(), "in_flight": lifecycle.in_flight}
        if lifecycle.draining:
            return JSONResponse({**error_body("The server is shutting down.", "service_unavailable"), **stats}, 503)
        if not engine.is_running:
            return JSONResponse(error_body("The engine is not running.", "service_unavailable"), 503)
        return {"status": "ok", **stats}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        check_auth(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        base = settings.served_model_name
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "qwen2vl", "root": name,
                  "parent": parent, "max_model_len": engine.max_model_len}
                 for name, parent in [(base, None), *((n, base) for n in settings.lora_names)]]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        with stages.stage("receiving"):
            body = await read_json(request, settings.max_request_bytes, settings.body_timeout)
        return await chat(request, body, time.perf_counter())

    if settings.web_ui:
        mount_web_ui(app, engine, settings)
    return app
