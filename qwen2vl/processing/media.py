"""Safe loading of images and videos from paths, URLs, data URIs, base64, bytes and in-memory objects.

Used by the image/video processors, the processor's chat-template path, the CLI and the server. Every failure is
a `ValueError` naming the input (long strings truncated); nothing falls back silently to another interpretation.
`MediaLimits` bundles the safety knobs so the server can pass stricter ones (no local files, small caps).

Decompression bombs: the image header's width*height is checked against `max_image_pixels` *before* any pixel
data is decoded. PIL's own guard (`Image.open` refuses > 2*PIL.Image.MAX_IMAGE_PIXELS, ~179M pixels) stays active
and is converted to ValueError, so caps above that need PIL's global raised by the application.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")


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


@dataclass
class VideoMetadata:
    """What the decoder knows about a video; `frames_indices` are the indices of the frames actually returned."""

    total_num_frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    video_backend: str | None = None
    frames_indices: list[int] | None = None

    @property
    def sampled_fps(self) -> float | None:
        if self.fps is None or not self.frames_indices or not self.total_num_frames:
            return self.fps
        return len(self.frames_indices) / self.total_num_frames * self.fps

    @property
    def timestamps(self) -> list[float]:
        if self.fps is None or self.frames_indices is None:
            raise MediaError("VideoMetadata.timestamps needs both `fps` and `frames_indices`.")
        return [i / self.fps for i in self.frames_indices]

    @classmethod
    def from_any(cls, value: "VideoMetadata | dict") -> "VideoMetadata":
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise MediaError(f"video_metadata has unknown keys {sorted(unknown)}.")
            return cls(**value)
        raise MediaError(f"video_metadata must be a VideoMetadata or dict, got {type(value).__name__}.")


def describe(source: Any, limit: int = 80) -> str:
    """Short, log-safe description of a media source (long strings / base64 truncated)."""
    if isinstance(source, (str, Path)):
        s = str(source)
        return repr(s) if len(s) <= limit else repr(s[:limit]) + f"... ({len(s)} chars)"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None) or getattr(source, "size", None)
    return f"<{type(source).__name__} {tuple(shape) if shape is not None else ''}>"


def _limits(limits: MediaLimits | None, **overrides: Any) -> MediaLimits:
    base = limits or DEFAULT_LIMITS
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------------------------
# Source resolution (shared by images and videos)


def _decode_base64(payload: str, what: str, max_bytes: int) -> bytes:
    payload = "".join(payload.split())  # tolerate line-wrapped base64
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError(f"{what}: base64 payload decodes to more than the {max_bytes}-byte limit.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{what}: invalid base64 ({e}).") from e


def _parse_data_uri(uri: str, what: str, max_bytes: int, kind: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{what}: data URI must look like 'data:{kind}/<type>;base64,<payload>'.")
    mime = header[5:].split(";")[0].lower()
    if mime and not mime.startswith(kind + "/") and mime != "application/octet-stream":
        raise MediaError(f"{what}: data URI has media type {mime!r}, expected {kind}/*.")
    return _decode_base64(payload, what, max_bytes)


parse_data_uri = _parse_data_uri  # public name for callers that hold a data: URL and want its bytes


def _local_path(source: str | Path, what: str, lim: MediaLimits) -> str:
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


def _http_stream(url: str, what: str, lim: MediaLimits, max_bytes: int, sink: Any) -> None:
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


def _is_remote(s: str) -> bool:
    return s.startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------------------------
# Images


def _check_pixels(width: int, height: int, what: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{what}: image has zero size ({width}x{height}).")
    if width * height > max_pixels:
        raise MediaError(
            f"{what}: image is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit "
            "(possible decompression bomb)."
        )


def _decode_image_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise MediaError(f"{what}: empty image data.")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: parses the header only
        _check_pixels(img.size[0], img.size[1], what, max_pixels)  # before any pixel data is decoded
        img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"{what}: rejected as a decompression bomb ({e}).") from e
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"{what}: not a recognised image format.") from e
    except Exception as e:  # truncated / corrupt data surfaces as OSError, SyntaxError, struct.error, ...
        raise MediaError(f"{what}: corrupt or truncated image ({type(e).__name__}: {e}).") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion that composites transparency on white (same rule as the reference's `convert_to_rgb`)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise MediaError(f"{what}: expected an (H,W), (H,W,C) or (C,H,W) array with C in 1/3/4.")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise MediaError(f"{what}: float image arrays must be in [0, 1].")
        arr = np.round(arr * 255)
    elif arr.size and (arr.min() < 0 or arr.max() > 255):
        raise MediaError(f"{what}: integer image arrays must be in [0, 255].")
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))


def load_image(
    source: Any,
    *,
    limits: MediaLimits | None = None,
    max_image_pixels: int | None = None,
    allow_local_files: bool | None = None,
    allow_remote: bool | None = None,
    timeout: float | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Load one image as an RGB, EXIF-transposed `PIL.Image`.

    `source`: PIL image | path (str/Path) | 'file://' URI | 'http(s)://' URL | 'data:image/...;base64,' URI |
    bare base64 string | bytes | numpy/torch array (HWC/CHW, uint8 or float in [0,1]).
    Keyword arguments override the matching `limits` fields (`max_bytes` -> `max_image_bytes`).
    Transparency is composited on white.
    """
    lim = _limits(limits, max_image_pixels=max_image_pixels, allow_local_files=allow_local_files,
                  allow_remote=allow_remote, timeout=timeout, max_image_bytes=max_bytes)
    what = f"image {describe(source)}"
    if isinstance(source, Image.Image):
        _check_pixels(source.size[0], source.size[1], what, lim.max_image_pixels)
        img = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        img = _array_to_pil(arr, what)
        _check_pixels(img.size[0], img.size[1], what, lim.max_image_pixels)
    else:
        data, bare_base64 = _image_bytes(source, what, lim)
        try:
            img = _decode_image_bytes(data, what, lim.max_image_pixels)
        except MediaError as e:
            if not bare_base64:
                raise
            # A typo'd path can also be valid base64: say both interpretations failed.
            raise MediaError(f"{e} (The string is not an existing file either; it was decoded as base64.)") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise MediaError(f"{what}: cannot apply EXIF orientation ({e}).") from e
    return to_rgb(img)


def _image_bytes(source: Any, what: str, lim: MediaLimits) -> tuple[bytes, bool]:
    """Encoded image bytes, and whether they came from interpreting a plain string as base64."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), False
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise MediaError(f"{what}: unsupported image source type {type(source).__name__}.")
    if not source:
        raise MediaError("image source is an empty string.")
    if _is_remote(source):
        buf = io.BytesIO()
        _http_stream(source, what, lim, lim.max_image_bytes, buf)
        return buf.getvalue(), False
    if source.startswith("data:"):
        return _parse_data_uri(source, what, lim.max_image_bytes, "image"), False
    # Without local-file permission we must not even probe the file system (existence would leak).
    if source.startswith("file://") or (lim.allow_local_files and os.path.isfile(os.path.expanduser(source))):
        with open(_local_path(source, what, lim), "rb") as f:
            return f.read(), False
    # Not a file, URL or data URI: the only remaining interpretation is bare base64; say so when it is not.
    try:
        return _decode_base64(source, what, lim.max_image_bytes), True
    except ValueError:
        if not lim.allow_local_files:
            raise MediaError(f"{what}: loading local files is not allowed here, and the string is not an "
                             "http(s):// or data: URL or valid base64.") from None
        raise MediaError(
            f"{what}: not an existing file, an http(s):// / file:// / data: URL, or valid base64."
        ) from None


def is_image_source_string(s: str) -> bool:
    """True for strings that name an image (by extension or data:image URI): used to tell frame lists from videos."""
    low = s.lower().split("?")[0]
    return low.startswith("data:image/") or low.endswith(_IMAGE_EXTS)


# ----------------------------------------------------------------------------------------------------------------
# Videos


def load_video(
    source: Any,
    *,
    sample_indices_fn: Callable[[VideoMetadata], Sequence[int]] | None = None,
    limits: MediaLimits | None = None,
    allow_local_files: bool | None = None,
    allow_remote: bool | None = None,
    timeout: float | None = None,
    max_bytes: int | None = None,
    frame_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode a video with PyAV into `(frames (F,H,W,3) uint8 RGB, VideoMetadata)`.

    `source`: path (str/Path) | 'file://' URI | 'http(s)://' URL (downloaded to a temp file under a byte cap) |
    'data:video/...;base64,' URI | bytes. `sample_indices_fn(metadata) -> indices` is called with the stream's
    frame count and fps *before* decoding, and only the selected frames are converted and kept in memory;
    `frame_fn((H,W,3) uint8) -> frame` transforms each kept frame as soon as it is decoded (e.g. resizes it to the
    processor's target size, so memory is bounded by the *resized* frames, not the decoded ones).
    """
    lim = _limits(limits, allow_local_files=allow_local_files, allow_remote=allow_remote, timeout=timeout,
                  max_video_bytes=max_bytes)
    what = f"video {describe(source)}"
    tmp_path = None
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            opener: Any = lambda: io.BytesIO(bytes(source))  # noqa: E731
        elif isinstance(source, (str, Path)):
            s = str(source)
            if _is_remote(s):
                with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as tmp:
                    tmp_path = tmp.name
                    _http_stream(s, what, lim, lim.max_video_bytes, tmp)
                opener = lambda: tmp_path  # noqa: E731
            elif s.startswith("data:"):
                data = _parse_data_uri(s, what, lim.max_video_bytes, "video")
                opener = lambda: io.BytesIO(data)  # noqa: E731
            else:
                path = _local_path(s, what, lim)
                opener = lambda: path  # noqa: E731
        else:
            raise MediaError(f"{what}: unsupported video source type {type(source).__name__}.")
        return _decode_video(opener, what, lim, sample_indices_fn, frame_fn)
    finally:
        if tmp_path is not None:
            os.unlink(tmp_path)


def _decode_video(opener: Callable[[], Any], what: str, lim: MediaLimits,
                  sample_indices_fn: Callable[[VideoMetadata], Sequence[int]] | None,
                  frame_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, VideoMetadata]:
    import av

    try:
        with av.open(opener()) as container:
            if not container.streams.video:
                raise MediaError(f"{what}: no video stream found.")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            width, height = stream.codec_context.width, stream.codec_context.height
            _check_pixels(width, height, what, lim.max_image_pixels)
            total = int(stream.frames or 0)
            if total <= 0:  # container does not store a frame count: count packets without decoding them
                total = sum(1 for packet in container.demux(stream) if packet.size)
        meta = VideoMetadata(total_num_frames=total, fps=fps, width=width, height=height,
                             duration=total / fps if fps else None, video_backend="pyav")
        for _attempt in range(2):
            if meta.total_num_frames <= 0:
                raise MediaError(f"{what}: video has no frames.")
            try:
                chosen = sample_indices_fn(meta) if sample_indices_fn else range(meta.total_num_frames)
                indices = [int(i) for i in chosen]
            except ValueError as e:
                raise MediaError(f"{what}: {e}") from e
            if not indices:
                raise MediaError(f"{what}: frame sampling selected no frames.")
            if min(indices) < 0 or max(indices) >= meta.total_num_frames:
                raise MediaError(f"{what}: frame indices must lie in [0, {meta.total_num_frames}).")
            if len(indices) > lim.max_video_frames:
                raise MediaError(f"{what}: {len(indices)} frames requested, over the limit of "
                                  f"{lim.max_video_frames}; sample with `fps` or `num_frames`.")
            kept, decoded = _decode_selected(av, opener(), indices, width, height, frame_fn)
            if all(i in kept for i in indices):
                meta.frames_indices = indices
                return np.stack([kept[i] for i in indices]), meta
            # The header over-stated the frame count: resample against the real count and decode again.
            meta = replace(meta, total_num_frames=decoded, duration=decoded / fps if fps else None)
        raise MediaError(f"{what}: could not decode the requested frames.")
    except MediaError:
        raise
    except Exception as e:  # av.FFmpegError and friends: corrupt, truncated or unsupported files
        raise MediaError(f"{what}: cannot decode video ({type(e).__name__}: {e}).") from e


def _decode_selected(av: Any, src: Any, indices: list[int], width: int, height: int,
                     frame_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[dict, int]:
    """Decode sequentially, keeping only frames whose index is wanted; stop after the last wanted one."""
    wanted, last, kept, count = set(indices), max(indices), {}, 0
    with av.open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            count = i + 1
            if i in wanted:
                rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
                kept[i] = frame_fn(rgb) if frame_fn is not None else rgb
            if i >= last:
                break
    return kept, count
