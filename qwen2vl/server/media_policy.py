"""Request messages → processor conversation, with every request's memory bounded before any work.

Three steps, each where it belongs:
1. `plan_media` (event loop, cheap): counts, roles, URL schemes, per-item options and the prompt's text length are
   checked; media parts become `MediaItem`s. Nothing is fetched, read or decoded yet.
2. `fetch_remote` (event loop, async HTTP, see `fetch.py`): http(s) items are downloaded under the SSRF policy,
   one deadline for the whole request and a byte cap each.
3. `load_media` (processing thread): data URLs are decoded and allowed local files read (`local_files.py`);
   each image's header gives its size, from which its vision tokens *after* the processor's resize are known:
   the request's total must fit the context before any pixel is decoded or resized. Videos keep their bytes;
   the video processor checks the remaining token budget from the container header and resizes each sampled
   frame as it is decoded (`MediaLimits.max_vision_tokens`, `max_video_frames`).

Policy (`MediaPolicy`): `data:` URLs always; `http(s)://` when `allow_remote` (default on, private addresses
refused by `fetch.FetchPolicy`); `file://` only under `allowed_local_media_path`; anything else is refused.
Every violation raises `APIError(400)`.
"""
from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field

from PIL import Image

from ..processing import media
from ..processing.image_processing import number_of_patches
from .fetch import FETCH_FAILED, FetchError, FetchPolicy, MediaFetcher
from .local_files import LocalFileError, read_local, relative_parts
from .media_defaults import MediaDefaults
from .protocol import APIError, ChatMessage, bad_request

QWEN_VL_UTILS_FPS = 2.0  # qwen-vl-utils' default sampling rate when a video names neither fps nor num_frames


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = True
    allowed_local_media_path: str | None = None
    max_images: int = 8
    max_videos: int = 1
    max_image_pixels: int = 32_000_000
    max_image_bytes: int = 20 * 1024**2
    max_video_bytes: int = 200 * 1024**2
    max_video_frames: int = 768
    max_prompt_chars: int | None = None  # None: 16 characters per token of context
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    defaults: MediaDefaults = MediaDefaults()  # server-wide min/max pixels and fps (media_defaults.py)

    def limits(self, max_vision_tokens: int | None = None) -> media.MediaLimits:
        # Everything reaches the processor as bytes: it never opens files or URLs itself.
        return media.MediaLimits(max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes,
                                 max_video_bytes=self.max_video_bytes, max_video_frames=self.max_video_frames,
                                 max_vision_tokens=max_vision_tokens, allow_local_files=False, allow_remote=False)


@dataclass
class MediaItem:
    kind: str  # "image" | "video"
    url: str
    where: str  # "messages[i].content[j]" for error messages
    block: dict  # the conversation block this item fills in (options already set)
    data: bytes | None = None

    @property
    def remote(self) -> bool:
        return self.url.startswith(("http://", "https://"))


def _refused(message: str) -> APIError:
    return bad_request(message, "messages", "media_not_allowed")


def _check_source(item: MediaItem, policy: MediaPolicy) -> None:
    what = f"{item.where} {item.kind}"
    if item.url.startswith("data:"):
        return
    if item.remote:
        if not policy.allow_remote:
            raise _refused(f"{what}: fetching remote URLs is disabled on this server "
                           "(start it with --allow-remote-media).")
        return
    if item.url.startswith("file://"):
        if not policy.allowed_local_media_path:
            raise _refused(f"{what}: local files are not allowed (the server was started without "
                           "--allowed-local-media-path).")
        try:
            relative_parts(item.url, policy.allowed_local_media_path)
        except LocalFileError as e:
            raise _refused(f"{what}: {e}") from None
        return
    raise bad_request(f"{what}: unsupported URL; use a data: URL (base64), an http(s):// URL or an allowed "
                      "file:// URL.", "messages")


def _pixel_bounds(obj, policy: MediaPolicy, where: str) -> dict:
    out = {k: getattr(obj, k) for k in ("min_pixels", "max_pixels") if getattr(obj, k, None) is not None}
    for key, v in out.items():
        if v > policy.max_image_pixels:
            raise bad_request(f"{where}: {key}={v} exceeds the server limit of {policy.max_image_pixels} "
                              "(--max-image-pixels).", "messages")
    if "min_pixels" in out and "max_pixels" in out and out["min_pixels"] > out["max_pixels"]:
        raise bad_request(f"{where}: min_pixels must be <= max_pixels.", "messages")
    return out


def _video_options(v, policy: MediaPolicy, where: str) -> dict:
    if v.fps is not None and v.num_frames is not None:
        raise bad_request(f"{where}: fps and num_frames are mutually exclusive.", "messages")
    if v.num_frames is not None and v.num_frames > policy.max_video_frames:
        raise bad_request(f"{where}: num_frames={v.num_frames} is over this server's limit of "
                          f"{policy.max_video_frames} frames (--max-video-frames).", "messages")
    if v.num_frames is not None:
        return {"num_frames": v.num_frames}
    if v.fps is not None:
        return {"fps": v.fps}
    return {"fps": policy.defaults.fps if policy.defaults.fps is not None else QWEN_VL_UTILS_FPS}


def plan_media(messages: list[ChatMessage], policy: MediaPolicy, max_model_len: int
               ) -> tuple[list[dict], list[MediaItem]]:
    """Validated pydantic messages → (HF-style conversation whose media blocks are filled by `load_media`,
    the media items). Raises APIError(400) before any media is touched."""
    counts = {"image": 0, "video": 0}
    caps = {"image": policy.max_images, "video": policy.max_videos}
    chars = 0
    conv, items = [], []
    for m_idx, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            chars += len(msg.content or "")
            conv.append({"role": role, "content": msg.content or ""})
            continue
        parts: list[dict] = []
        for p_idx, part in enumerate(msg.content):
            where = f"messages[{m_idx}].content[{p_idx}]"
            if part.type == "text":
                chars += len(part.text)
                parts.append({"type": "text", "text": part.text})
                continue
            kind = "image" if part.type == "image_url" else "video"
            counts[kind] += 1
            if counts[kind] > caps[kind]:
                raise bad_request(f"Too many {kind}s: at most {caps[kind]} per request.", "messages",
                                  f"too_many_{kind}s")
            if role != "user":
                raise bad_request(f"{where}: {kind}s are only supported in user messages.", "messages")
            src = part.image_url if kind == "image" else part.video_url
            block = {"type": kind, kind: None, **_pixel_bounds(src, policy, where)}
            if kind == "video":
                block.update(_video_options(src, policy, where))
            policy.defaults.apply(block, video=kind == "video")  # server-wide defaults fill what the request left out
            item = MediaItem(kind, src.url, where, block)
            _check_source(item, policy)
            items.append(item)
            parts.append(block)
        conv.append({"role": role, "content": parts})
    max_chars = policy.max_prompt_chars or 16 * max_model_len
    if chars > max_chars:  # checked before tokenization: tokenizing megabytes of text costs seconds and GBs
        raise bad_request(f"The messages have {chars} characters of text, over this server's limit of {max_chars} "
                          f"(the context is {max_model_len} tokens).", "messages", "context_length_exceeded")
    return conv, items


async def fetch_remote(items: list[MediaItem], policy: MediaPolicy, fetcher: MediaFetcher) -> None:
    """Download the request's http(s) items concurrently, all under one deadline."""
    remote = [it for it in items if it.remote]
    if not remote:
        return

    async def one(it: MediaItem) -> None:
        cap = policy.max_image_bytes if it.kind == "image" else policy.max_video_bytes
        try:
            it.data = await fetcher.fetch(it.url, cap)
        except FetchError as e:
            raise bad_request(f"{it.where} {it.kind}: {e}", "messages", e.code) from None

    try:
        async with asyncio.timeout(policy.fetch.deadline):
            await asyncio.gather(*(one(it) for it in remote))
    except TimeoutError:
        raise bad_request(f"{remote[0].where} {remote[0].kind}: {FETCH_FAILED}", "messages",
                          "media_fetch_failed") from None


def _item_bytes(it: MediaItem, policy: MediaPolicy) -> bytes:
    cap = policy.max_image_bytes if it.kind == "image" else policy.max_video_bytes
    what = f"{it.where} {it.kind}"
    if it.data is not None:
        return it.data
    if it.url.startswith("data:"):
        try:
            return media.parse_data_uri(it.url, what, cap, it.kind)
        except media.MediaError as e:
            raise bad_request(str(e), "messages", f"invalid_{it.kind}") from None
    try:
        return read_local(it.url, policy.allowed_local_media_path, cap)
    except LocalFileError as e:
        raise _refused(f"{what}: {e}") from None


def _image_tokens(data: bytes, block: dict, image_processor, policy: MediaPolicy, what: str) -> int:
    """Vision tokens of this image after the processor's resize, from its header alone."""
    try:
        width, height = Image.open(io.BytesIO(data)).size  # lazy: parses the header only
    except Exception:
        raise bad_request(f"{what}: not a recognised image format.", "messages", "invalid_image") from None
    if width * height > policy.max_image_pixels:
        raise bad_request(f"{what}: image is {width}x{height} = {width * height} pixels, over the "
                          f"{policy.max_image_pixels}-pixel limit.", "messages", "invalid_image")
    gh, gw = number_of_patches(height, width, image_processor, block)
    return gh * gw // image_processor.merge_size ** 2


def load_media(conv: list[dict], items: list[MediaItem], policy: MediaPolicy, processor, budget: int
               ) -> media.MediaLimits:
    """Fill the conversation's media blocks (processing thread); returns the limits for the processor.
    `budget`: vision tokens the request may use (the context length)."""
    images = [it for it in items if it.kind == "image"]
    payloads = {id(it): _item_bytes(it, policy) for it in items}
    used = 0
    for it in images:
        used += _image_tokens(payloads[id(it)], it.block, processor.image_processor, policy, f"{it.where} image")
    if used > budget:
        raise bad_request(f"The images need {used} vision tokens after resizing, over the context length of "
                          f"{budget}; send fewer or smaller images or lower max_pixels.", "messages",
                          "context_length_exceeded")
    limits = policy.limits(max_vision_tokens=budget - used)
    for it in items:
        what = f"{it.where} {it.kind}"
        data = payloads[id(it)]
        if it.kind == "image":
            try:
                it.block["image"] = media.load_image(data, limits=limits)
            except media.MediaError as e:
                raise bad_request(_clean(str(e), data, what), "messages", "invalid_image") from None
        else:
            it.block["video"] = data
    return limits


def _clean(message: str, source, what: str) -> str:
    """Media errors name the request part, never the (possibly huge) payload."""
    short = media.describe(source)
    return message.replace(f"image {short}", what).replace(f"video {short}", what)


def to_conversation(messages: list[ChatMessage], policy: MediaPolicy, max_model_len: int = 1 << 30) -> list[dict]:
    """Validation only (step 1), for callers that want the checks without a server: the conversation with
    its media blocks still empty."""
    return plan_media(messages, policy, max_model_len)[0]
