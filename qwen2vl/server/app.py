"""FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, and the chat page at `GET /`.

`create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI`. Every error leaves as the OpenAI error JSON
with its status (400 bad input, 401 bad key, 404 unknown model/route, 429 queue full, 503 shutting down, 500
generic: tracebacks are logged, never sent). The engine is shut down (running requests aborted, threads joined)
when the app's lifespan ends.
"""
from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import AsyncEngine
from .media import MediaPolicy
from .protocol import APIError, bad_request, error_body, now
from .serving import ChatHandler
from .web_ui import mount_web_ui

logger = logging.getLogger("qwen2vl.server")


@dataclass
class ServerSettings:
    served_model_name: str = "qwen2vl-demo"
    model_aliases: tuple[str, ...] = ()  # other names accepted in `model` (e.g. the path it was loaded from)
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_request_bytes: int = 32 * 1024**2
    default_sampling: dict = field(default_factory=dict)  # from generation_config.json
    drain_on_shutdown: bool = False
    web_ui: bool = True  # the chat page at `/` (web_ui.py)


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object, refusing bodies over `max_bytes` (checked while streaming)."""
    declared = request.headers.get("content-length")
    too_big = bad_request(f"Request body too large: the limit is {max_bytes} bytes.", None, "request_too_large")
    if declared and declared.isdigit() and int(declared) > 4 * max_bytes:
        raise too_big
    buf, total = bytearray(), 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= max_bytes:
            buf += chunk
        elif total > 4 * max_bytes:  # stop draining a hostile upload; the connection is closed afterwards
            break
    if total > max_bytes:
        raise too_big
    try:
        data = json.loads(bytes(buf))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"Malformed JSON body: {e}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("Malformed JSON body: nested too deeply.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    return data


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown_async(drain=settings.drain_on_shutdown)

    app = FastAPI(title="qwen2vl OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    chat = ChatHandler(engine, settings)
    created = now()

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
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(f"Invalid request: {exc.errors()[:3]}", "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("Internal server error.", "internal_server_error"), 500)

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return JSONResponse(error_body("The engine is not running.", "service_unavailable"), 503)
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        card = {"id": settings.served_model_name, "object": "model", "created": created, "owned_by": "qwen2vl",
                "root": settings.served_model_name, "parent": None, "max_model_len": engine.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_json(request, settings.max_request_bytes)
        return await chat(request, body)

    if settings.web_ui:
        mount_web_ui(app, engine, settings)
    return app
