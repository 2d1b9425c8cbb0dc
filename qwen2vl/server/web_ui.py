"""The chat page served by `qwen2vl serve` at `GET /` (off with `--no-web-ui`).

Plain HTML/CSS/JS shipped as package data (`static/`): no build step, no CDN, works offline. The page talks to
the server's own `POST /v1/chat/completions` (SSE) like any other client, so every limit and security check of the
API applies to it unchanged. `GET /ui/config` tells the page what it needs before the first request: the model
name, the upload caps it resizes to, and whether an API key is required (never the key itself).
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

# The page loads only its own files; images and videos the user picks are shown from data:/blob: URLs.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
        "frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
_ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
           "/ui/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
           "/ui/chat.css": ("chat.css", "text/css; charset=utf-8")}


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def page_config(engine, settings) -> dict:
    """What the page needs to know about this server: caps to resize uploads to, defaults for its settings."""
    ip = getattr(engine.processor, "image_processor", None)
    media = settings.media
    return {"model": settings.served_model_name, "auth_required": settings.api_key is not None,
            "max_image_pixels": media.max_image_pixels, "max_image_bytes": media.max_image_bytes,
            "max_video_bytes": media.max_video_bytes, "max_images_per_request": media.max_images,
            "max_videos_per_request": media.max_videos, "max_request_bytes": settings.max_request_bytes,
            "default_max_pixels": min(int(getattr(ip, "max_pixels", None) or media.max_image_pixels),
                                      media.max_image_pixels),
            "max_model_len": engine.max_model_len}


def mount_web_ui(app: FastAPI, engine, settings) -> None:
    """Add `GET /`, the page's two assets and `GET /ui/config` to `app`."""
    for path, (name, media_type) in _ASSETS.items():
        body = _asset(name)  # read once at start-up: a missing asset fails here, not on a user's first visit

        async def serve(body=body, media_type=media_type):
            return Response(body, media_type=media_type, headers=_HEADERS)

        app.add_api_route(path, serve, methods=["GET"], include_in_schema=False)

    async def config():
        return JSONResponse(page_config(engine, settings), headers={"Cache-Control": "no-store"})

    app.add_api_route("/ui/config", config, methods=["GET"], include_in_schema=False)
