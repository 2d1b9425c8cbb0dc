"""Server-wide media defaults: `qwen2vl serve --min-pixels N --max-pixels N --fps F` and vLLM's
`--mm-processor-kwargs '{"min_pixels": ..., "max_pixels": ..., "fps": ...}'` (the explicit flags win).

They fill in what a request's own `image_url` / `video_url` block leaves out (min/max pixels for images and
videos, fps for videos that set neither fps nor num_frames); a request's own values always win, within the
server's caps (`--max-image-pixels`, checked by `media.to_conversation`). When a request sets only one bound and
the server default of the other would contradict it (min > max), the default is clamped to the request's bound.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

KEYS = ("min_pixels", "max_pixels", "fps")


@dataclass(frozen=True)
class MediaDefaults:
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None

    def apply(self, block: dict, video: bool) -> dict:
        """Fill the defaults into one processor content block (in place; returns it)."""
        for key in ("min_pixels", "max_pixels"):
            if getattr(self, key) is not None and key not in block:
                block[key] = getattr(self, key)
        lo, hi = block.get("min_pixels"), block.get("max_pixels")
        if lo is not None and hi is not None and lo > hi:  # only a default can be the odd one out here
            if lo == self.min_pixels:
                block["min_pixels"] = hi
            else:
                block["max_pixels"] = lo
        if video and self.fps is not None and "fps" not in block and "num_frames" not in block:
            block["fps"] = self.fps
        return block


def from_args(args) -> MediaDefaults:
    """--mm-processor-kwargs (JSON object) overlaid by --min-pixels / --max-pixels / --fps; ValueError naming
    the bad option."""
    kwargs = {}
    raw = getattr(args, "mm_processor_kwargs", None)
    if raw:
        try:
            kwargs = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--mm-processor-kwargs must be a JSON object: {e}") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--mm-processor-kwargs must be a JSON object")
        unknown = sorted(set(kwargs) - set(KEYS))
        if unknown:
            raise ValueError(f"--mm-processor-kwargs: unsupported keys {unknown} (supported: {list(KEYS)})")
    for key in KEYS:
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    for key in ("min_pixels", "max_pixels"):
        v = kwargs.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= args.max_image_pixels):
            raise ValueError(f"{key} must be an integer in [1, --max-image-pixels={args.max_image_pixels}], got {v!r}")
    if kwargs.get("min_pixels") and kwargs.get("max_pixels") and kwargs["min_pixels"] > kwargs["max_pixels"]:
        raise ValueError("min_pixels must be <= max_pixels")
    fps = kwargs.get("fps")
    if fps is not None and not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    return MediaDefaults(**kwargs)
