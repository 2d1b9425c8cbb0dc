"""Safe loading of images and videos from paths, URLs, data URIs, base64, bytes and in-memory objects.

This module is the public media API and holds image loading (`load_image`); the sources and limits are in
`media_sources`, video decoding in `video_loading` (`load_video`, `VideoMetadata`, re-exported here).

Used by the image/video processors, the processor's chat-template path, the CLI and the server. Every failure is
a `ValueError` naming the input (long strings truncated); nothing falls back silently to another interpretation.
`MediaLimits` bundles the safety knobs so the server can pass stricter ones (no local files, small caps).

Decompression bombs: the image header's width*height is checked against `max_image_pixels` *before* any pixel
data is decoded. PIL's own guard (`Image.open` refuses > 2*PIL.Image.MAX_IMAGE_PIXELS, ~179M pixels) stays active
and is converted to ValueError, so caps above that need PIL's global raised by the application.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .media_sources import (DEFAULT_LIMITS, MediaError, MediaLimits, check_pixels, decode_base64,  # noqa: F401
                            describe, http_stream, is_remote, limits_with, local_path, parse_data_uri)
from .video_loading import VideoMetadata, load_video  # noqa: F401 (this module is the public media API)

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")


def _decode_image_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise MediaError(f"{what}: empty image data.")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: parses the header only
        check_pixels(img.size[0], img.size[1], what, max_pixels)  # before any pixel data is decoded
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
    lim = limits_with(limits, max_image_pixels=max_image_pixels, allow_local_files=allow_local_files,
                  allow_remote=allow_remote, timeout=timeout, max_image_bytes=max_bytes)
    what = f"image {describe(source)}"
    if isinstance(source, Image.Image):
        check_pixels(source.size[0], source.size[1], what, lim.max_image_pixels)
        img = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        img = _array_to_pil(arr, what)
        check_pixels(img.size[0], img.size[1], what, lim.max_image_pixels)
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
    if is_remote(source):
        buf = io.BytesIO()
        http_stream(source, what, lim, lim.max_image_bytes, buf)
        return buf.getvalue(), False
    if source.startswith("data:"):
        return parse_data_uri(source, what, lim.max_image_bytes, "image"), False
    # Without local-file permission we must not even probe the file system (existence would leak).
    if source.startswith("file://") or (lim.allow_local_files and os.path.isfile(os.path.expanduser(source))):
        with open(local_path(source, what, lim), "rb") as f:
            return f.read(), False
    # Not a file, URL or data URI: the only remaining interpretation is bare base64; say so when it is not.
    try:
        return decode_base64(source, what, lim.max_image_bytes), True
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
