"""Video loading: `load_video(source) -> (frames (F,H,W,3) uint8 RGB, VideoMetadata)` with PyAV, only the sampled
frames decoded and kept (see `processing.media` for the sources and limits)."""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .media_sources import (MediaError, MediaLimits, check_pixels, describe, http_stream, is_remote, limits_with,
                            local_path, parse_data_uri)


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
    lim = limits_with(limits, allow_local_files=allow_local_files, allow_remote=allow_remote, timeout=timeout,
                  max_video_bytes=max_bytes)
    what = f"video {describe(source)}"
    tmp_path = None
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            opener: Any = lambda: io.BytesIO(bytes(source))  # noqa: E731
        elif isinstance(source, (str, Path)):
            s = str(source)
            if is_remote(s):
                with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as tmp:
                    tmp_path = tmp.name
                    http_stream(s, what, lim, lim.max_video_bytes, tmp)
                opener = lambda: tmp_path  # noqa: E731
            elif s.startswith("data:"):
                data = parse_data_uri(s, what, lim.max_video_bytes, "video")
                opener = lambda: io.BytesIO(data)  # noqa: E731
            else:
                path = local_path(s, what, lim)
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
            check_pixels(width, height, what, lim.max_image_pixels)
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
