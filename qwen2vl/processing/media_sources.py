"""Where media bytes come from, under safety limits: `MediaLimits` / `MediaError`, data URIs and base64, local paths
(only where allowed), http(s) downloads streamed under a byte cap; shared by image (`media`) and video
(`video_loading`) loading. Every failure is a `MediaError` (a ValueError) naming the input (`describe`)."""
from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MediaLimits:
    """Safety limits for media loading; `dataclasses.replace(limits, ...)` to derive stricter ones."""

    max_image_pixels: int = 64_000_000  # width*height from the header, checked before decoding
    max_image_bytes: int = 64 * 1024**2  # downloaded / base64 / data-URI image payloads
    max_video_bytes: int = 1024**3  # downloaded / data-URI video payloads
    max_video_frames: int = 4096  # frames kept in memory after sampling (also caps fps sampling's max_frames)
    max_vision_tokens: int | None = None  # a video's merged-patch tokens, checked before any frame is decoded
    timeout: float = 10.0  # seconds, per HTTP request phase (connect/read)
    max_redirects: int = 5
    allow_local_files: bool = True  # plain paths and file:// URIs
    allow_remote: bool = True  # http(s):// URLs


DEFAULT_LIMITS = MediaLimits()


class MediaError(ValueError):
    """Raised for every media problem (a ValueError, so callers can catch either)."""


def describe(source: Any, limit: int = 80) -> str:
    """Short, log-safe description of a media source (long strings / base64 truncated)."""
    if isinstance(source, (str, Path)):
        s = str(source)
        return repr(s) if len(s) <= limit else repr(s[:limit]) + f"... ({len(s)} chars)"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None) or getattr(source, "size", None)
    return f"<{type(source).__name__} {tuple(shape) if shape is not None else ''}>"


def limits_with(limits: MediaLimits | None, **overrides: Any) -> MediaLimits:
    base = limits or DEFAULT_LIMITS
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def decode_base64(payload: str, what: str, max_bytes: int) -> bytes:
    payload = "".join(payload.split())  # tolerate line-wrapped base64
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError(f"{what}: base64 payload decodes to more than the {max_bytes}-byte limit.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{what}: invalid base64 ({e}).") from e


def parse_data_uri(uri: str, what: str, max_bytes: int, kind: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{what}: data URI must look like 'data:{kind}/<type>;base64,<payload>'.")
    mime = header[5:].split(";")[0].lower()
    if mime and not mime.startswith(kind + "/") and mime != "application/octet-stream":
        raise MediaError(f"{what}: data URI has media type {mime!r}, expected {kind}/*.")
    return decode_base64(payload, what, max_bytes)


def local_path(source: str | Path, what: str, lim: MediaLimits) -> str:
    if not lim.allow_local_files:
        raise MediaError(f"{what}: loading local files is not allowed here.")
    s = str(source)
    if s.startswith("file://"):
        parsed = urllib.parse.urlparse(s)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"{what}: file:// URIs must refer to the local host.")
        s = urllib.request.url2pathname(parsed.path)
    path = os.path.expanduser(s)
    if not os.path.isfile(path):
        raise MediaError(f"{what}: file not found.")
    return path


def http_stream(url: str, what: str, lim: MediaLimits, max_bytes: int, sink: Any) -> None:
    """Stream `url` into `sink.write`, enforcing the byte cap while streaming (Content-Length is not trusted)."""
    if not lim.allow_remote:
        raise MediaError(f"{what}: loading remote URLs is not allowed here.")
    import httpx

    try:
        with httpx.Client(follow_redirects=True, max_redirects=lim.max_redirects, timeout=lim.timeout) as client:
            with client.stream("GET", url) as resp:
                if resp.status_code >= 400:
                    raise MediaError(f"{what}: HTTP {resp.status_code} while downloading.")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise MediaError(f"{what}: download is {declared} bytes, over the {max_bytes}-byte limit.")
                received = 0
                for chunk in resp.iter_bytes():
                    received += len(chunk)
                    if received > max_bytes:
                        raise MediaError(f"{what}: download exceeds the {max_bytes}-byte limit.")
                    sink.write(chunk)
    except httpx.TooManyRedirects as e:
        raise MediaError(f"{what}: more than {lim.max_redirects} redirects.") from e
    except httpx.TimeoutException as e:
        raise MediaError(f"{what}: timed out after {lim.timeout}s.") from e
    except httpx.HTTPError as e:
        raise MediaError(f"{what}: download failed ({type(e).__name__}: {e}).") from e


def is_remote(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def check_pixels(width: int, height: int, what: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{what}: image has zero size ({width}x{height}).")
    if width * height > max_pixels:
        raise MediaError(
            f"{what}: image is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit "
            "(possible decompression bomb)."
        )
