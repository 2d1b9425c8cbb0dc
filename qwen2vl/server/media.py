"""Request messages → processor conversation, loading media under the server's security policy.

Policy (`MediaPolicy`):
* `data:` URLs (base64) are always accepted, under the byte and pixel caps;
* `http(s)://` URLs are fetched only when `allow_remote` (on by default, `--no-allow-remote-media` turns it
  off); downloads are streamed under the byte cap with a timeout and a redirect limit;
* `file://` URLs are read only when `allowed_local_media_path` is set and the resolved real path (symlinks
  followed) lies inside it; anything else (bare paths, bare base64, other schemes) is rejected;
* at most `max_images` images and `max_videos` videos per request; image width*height is checked against
  `max_image_pixels` from the header before any pixel is decoded (decompression bombs);
* per-image `min_pixels` / `max_pixels` (qwen-vl-utils options inside `image_url`) must be <= that cap.
Every violation raises `APIError(400)`. Runs on a processing thread (image decoding is CPU work).
"""
from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace

from ..processing import media
from .media_defaults import MediaDefaults
from .protocol import APIError, ChatMessage, bad_request


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = True
    allowed_local_media_path: str | None = None
    max_images: int = 8
    max_videos: int = 1
    max_image_pixels: int = 32_000_000
    max_image_bytes: int = 20 * 1024**2
    max_video_bytes: int = 200 * 1024**2
    timeout: float = 10.0
    defaults: MediaDefaults = MediaDefaults()  # server-wide min/max pixels and fps (media_defaults.py)

    def limits(self, allow_local: bool = False) -> media.MediaLimits:
        return media.MediaLimits(max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes,
                                 max_video_bytes=self.max_video_bytes, timeout=self.timeout,
                                 allow_local_files=allow_local, allow_remote=self.allow_remote)


def _check_source(url: str, policy: MediaPolicy, what: str) -> bool:
    """Validate a media URL against the policy; returns True when it is an allowed local file."""
    if url.startswith("data:"):
        return False
    if url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise bad_request(f"{what}: fetching remote URLs is disabled on this server "
                              "(start it with --allow-remote-media).", "messages", "media_not_allowed")
        return False
    if url.startswith("file://"):
        root = policy.allowed_local_media_path
        if not root:
            raise bad_request(f"{what}: local files are not allowed (the server was started without "
                              "--allowed-local-media-path).", "messages", "media_not_allowed")
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{what}: file:// URLs must refer to the local host.", "messages")
        path = os.path.realpath(urllib.request.url2pathname(parsed.path))
        root = os.path.realpath(root)
        if os.path.commonpath([path, root]) != root:
            raise bad_request(f"{what}: the file is outside the allowed local media path.", "messages",
                              "media_not_allowed")
        if not os.path.isfile(path):
            raise bad_request(f"{what}: file not found.", "messages")
        return True
    raise bad_request(f"{what}: unsupported URL; use a data: URL (base64), an http(s):// URL or an allowed "
                      "file:// URL.", "messages")


def _pixel_bounds(obj, policy: MediaPolicy, what: str) -> dict:
    out = {}
    for key in ("min_pixels", "max_pixels"):
        v = getattr(obj, key, None)
        if v is not None:
            if v > policy.max_image_pixels:
                raise bad_request(f"{what}: {key}={v} exceeds the server limit of {policy.max_image_pixels}.",
                                  "messages")
            out[key] = v
    if "min_pixels" in out and "max_pixels" in out and out["min_pixels"] > out["max_pixels"]:
        raise bad_request(f"{what}: min_pixels must be <= max_pixels.", "messages")
    return out


def _load_image(url: str, policy: MediaPolicy, what: str):
    local = _check_source(url, policy, what)
    try:
        return media.load_image(url, limits=policy.limits(allow_local=local))
    except media.MediaError as e:
        raise bad_request(_clean(str(e), url, what), "messages", "invalid_image") from None


def _clean(message: str, url: str, what: str) -> str:
    """Media errors name the source; never echo a (possibly huge) data URL back."""
    short = media.describe(url)
    message = message.replace(f"image {short}", what).replace(f"video {short}", what)
    return message.replace(url, "<url>")


def to_conversation(messages: list[ChatMessage], policy: MediaPolicy) -> tuple[list[dict], media.MediaLimits]:
    """Validated pydantic messages → HF-style conversation (images decoded to PIL, videos as checked URLs)
    plus the media limits under which the processor may open the video URLs."""
    n_img = n_vid = 0
    local_videos = False
    conv: list[dict] = []
    for m_idx, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            conv.append({"role": role, "content": msg.content or ""})
            continue
        parts: list[dict] = []
        for p_idx, part in enumerate(msg.content):
            where = f"messages[{m_idx}].content[{p_idx}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            elif part.type == "image_url":
                n_img += 1
                if n_img > policy.max_images:
                    raise bad_request(f"Too many images: at most {policy.max_images} per request.", "messages",
                                      "too_many_images")
                if role != "user":
                    raise bad_request(f"{where}: images are only supported in user messages.", "messages")
                block = {"type": "image", "image": _load_image(part.image_url.url, policy, f"{where} image")}
                block.update(_pixel_bounds(part.image_url, policy, where))
                parts.append(policy.defaults.apply(block, video=False))
            else:
                n_vid += 1
                if n_vid > policy.max_videos:
                    raise bad_request(f"Too many videos: at most {policy.max_videos} per request.", "messages",
                                      "too_many_videos")
                if role != "user":
                    raise bad_request(f"{where}: videos are only supported in user messages.", "messages")
                v = part.video_url
                local_videos |= _check_source(v.url, policy, f"{where} video")
                block = {"type": "video", "video": v.url, **_pixel_bounds(v, policy, where)}
                if v.fps is not None and v.num_frames is not None:
                    raise bad_request(f"{where}: fps and num_frames are mutually exclusive.", "messages")
                block.update({k: getattr(v, k) for k in ("fps", "num_frames") if getattr(v, k) is not None})
                parts.append(policy.defaults.apply(block, video=True))
        conv.append({"role": role, "content": parts})
    return conv, replace(policy.limits(allow_local=local_videos))


def as_api_error(e: Exception) -> APIError:
    """Errors raised while processing a prompt (media decoding, processor validation) → 400."""
    if isinstance(e, APIError):
        return e
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if len(msg) > 500:
        msg = msg[:500] + "..."
    return bad_request(msg, "messages")
