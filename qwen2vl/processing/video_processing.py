"""`Qwen2VLVideoProcessor`: frame sampling (fps / num_frames), per-video resize, normalize and patchify.

Output: `pixel_values_videos (sum t*h*w, C*T*p*p)` float32 with rows (t, bh, bw, ih, iw) and columns (C, T, y, x);
`video_grid_thw (num_videos, 3)` int64. Odd frame counts are padded by repeating the last frame. Resizing uses the
same torch path as `Qwen2VLImageProcessor` (torchvision-equivalent bicubic antialias, no torchvision needed).

Accepted `videos`: a path/URL/data URI/bytes of a video file (decoded with PyAV, only sampled frames kept), a list
of PIL frames, a 4-D array/tensor (F,H,W,C) or (F,C,H,W), a list of image paths/URLs forming one video (strings
with an image extension or data:image URIs), or a (nested) list of any of these (one entry per video).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .batch_feature import BatchFeature
from .image_processing import _channels_first, number_of_patches, smart_resize, to_chw_array
from .media import MediaLimits, VideoMetadata, is_image_source_string, load_image, load_video
from .patchify import channel_lut, lut_patchify, patchify, torch_rescale_normalize, torch_resize
from .processor_config import ProcessorConfigMixin, resolve_config_file


def sample_frame_indices(total_num_frames: int, video_fps: float | None = None, *, fps: float | None = None,
                         num_frames: int | None = None, min_frames: int = 4, max_frames: int = 768,
                         temporal_patch_size: int = 2) -> list[int]:
    """Indices of the frames to keep, exactly as the reference's `sample_frames`.

    num_frames: rounded (banker's) to a multiple of T. fps: `total/video_fps*fps` clamped to
    [min_frames, min(max_frames, total)] then floored to a multiple of T. Indices are
    `arange(0, total, total/n).int()`. Neither given: all frames (the reference raises TypeError there).
    """
    if fps is not None and num_frames is not None:
        raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
    t, total = temporal_patch_size, int(total_num_frames)
    if num_frames is not None:
        n = round(num_frames / t) * t
    elif fps is not None:
        if not video_fps:
            raise ValueError("Asked to sample `fps` frames per second but the video's frame rate is unknown; pass "
                             "video_metadata={'fps': ...} for frame arrays, or use `num_frames` instead.")
        max_f = math.floor(min(max_frames, total) / t) * t
        n = min(max(total / video_fps * fps, min_frames), max_f, total)
        n = math.floor(n / t) * t
    else:
        return list(range(total))
    if n <= 0:
        raise ValueError(f"Frame sampling (fps={fps}, num_frames={num_frames}) selects {n} frames from a "
                         f"{total}-frame video; at least temporal_patch_size={t} frames are needed.")
    if n > total:
        raise ValueError(f"Video can't be sampled. The inferred `num_frames={n}` exceeds `total_num_frames={total}`. "
                         "Decrease `num_frames` or `fps` for sampling.")
    return torch.arange(0, total, total / n).int().tolist()


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3)


def flatten_videos(videos: Any) -> list[Any]:
    """One entry per video: a file source (str/Path/bytes), a list of frames/image sources, or a 4-D array."""
    if isinstance(videos, (str, Path, bytes, bytearray)):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        if videos.ndim == 3:
            return [[videos]]
        raise ValueError(f"A video array must have 4 dims (F,H,W,C)/(F,C,H,W), got shape {tuple(videos.shape)}.")
    if isinstance(videos, Image.Image):
        return [[videos]]
    if isinstance(videos, tuple) and len(videos) == 2 and isinstance(videos[1], VideoMetadata):
        return [videos]  # `load_video` output: (frames, metadata)
    if isinstance(videos, (list, tuple)):
        if not videos:
            return []
        if all(_is_frame(x) for x in videos):
            return [list(videos)]
        if all(isinstance(x, str) and is_image_source_string(x) for x in videos):
            return [list(videos)]
        return [v for item in videos for v in flatten_videos(item)]
    raise ValueError(f"Unsupported video input of type {type(videos).__name__}.")


def _flatten_metadata(meta: Any, n: int) -> list[VideoMetadata | None]:
    if meta is None:
        return [None] * n
    if isinstance(meta, (dict, VideoMetadata)):
        meta = [meta]
    flat = [m for item in meta for m in (item if isinstance(item, (list, tuple)) else [item])]
    if len(flat) != n:
        raise ValueError(f"Received {n} videos but {len(flat)} video_metadata entries; pass one per video.")
    return [None if m is None else VideoMetadata.from_any(m) for m in flat]


class Qwen2VLVideoProcessor(ProcessorConfigMixin):
    """Video processor. Call:

    `proc(videos, fps=None, num_frames=None, min_frames=None, max_frames=None, do_sample_frames=None,
    min_pixels=None, max_pixels=None, size=None, total_pixels=None, video_metadata=None, return_metadata=False,
    return_tensors=None, device=None, media_limits=None, **options)`.

    Passing `fps` or `num_frames` turns sampling on; `do_sample_frames=True` with neither keeps all frames.
    `total_pixels` caps the per-frame budget like qwen-vl-utils:
    `max(min(max_pixels, total_pixels / nframes * T), int(1.05 * min_pixels))`.
    """

    config_name = "video_preprocessor_config.json"
    type_key = "video_processor_type"
    saved_type = "Qwen2VLVideoProcessor"
    default_size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    defaults = dict(ProcessorConfigMixin.defaults, min_frames=4, max_frames=768, do_sample_frames=False, fps=None,
                    num_frames=None, total_pixels=None, cap_pixels_per_frame=False, max_video_tokens=128000)
    call_only_keys = ("return_tensors", "input_data_format", "device", "video_metadata", "return_metadata",
                      "media_limits")
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    @classmethod
    def _load_config(cls, name_or_path: Any, hub_kwargs: dict) -> dict[str, Any]:
        """Prefer video_preprocessor_config.json; else inherit the image config (as the reference does)."""
        path = resolve_config_file(name_or_path, cls.config_name, required=False, **hub_kwargs)
        if path is None:
            path = resolve_config_file(name_or_path, "preprocessor_config.json", **hub_kwargs)
        return json.loads(Path(path).read_text(encoding="utf-8"))

    def _sampling(self, kwargs: dict) -> tuple[bool, float | None, int | None]:
        call_fps, call_n = kwargs.get("fps"), kwargs.get("num_frames")
        if call_fps is not None and call_n is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        sample = kwargs.get("do_sample_frames")
        if sample is None:
            sample = bool(self.do_sample_frames) or call_fps is not None or call_n is not None
        elif not sample and (call_fps is not None or call_n is not None):
            raise ValueError("fps/num_frames were given but do_sample_frames=False; drop one of them.")
        if call_fps is not None or call_n is not None:
            return sample, call_fps, call_n
        # Config-level values: num_frames wins over fps, as in the reference.
        return sample, (None if self.num_frames is not None else self.fps), self.num_frames

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        sample, fps, num_frames = self._sampling(kwargs)
        o = self._options(kwargs)
        T = o["temporal_patch_size"]

        limits: MediaLimits | None = o["media_limits"]
        max_frames = min(o["max_frames"], limits.max_video_frames) if limits is not None else o["max_frames"]

        def indices_for(meta: VideoMetadata) -> list[int]:
            if not sample:
                return list(range(meta.total_num_frames))
            return sample_frame_indices(meta.total_num_frames, meta.fps, fps=fps, num_frames=num_frames,
                                        min_frames=o["min_frames"], max_frames=max_frames, temporal_patch_size=T)

        entries = flatten_videos(videos)
        if not entries:
            raise ValueError("No videos given (empty list).")
        metas = _flatten_metadata(o["video_metadata"], len(entries))
        all_patches, grids, out_meta = [], [], []
        for entry, meta in zip(entries, metas):
            if isinstance(entry, tuple):  # (frames, VideoMetadata) as returned by media.load_video
                entry, meta = entry[0], meta or entry[1]
            frames, meta = self._decode(entry, meta, indices_for, o)
            # (F, H, W, C) stack, seen as a channels-last (F, C, H, W) tensor: one memcpy-like copy of HWC frames
            # and the resize kernel's fastest layout.
            x = torch.from_numpy(np.stack([f.transpose(1, 2, 0) for f in frames])).permute(0, 3, 1, 2)
            if o["device"] is not None:
                x = x.to(o["device"])
            if o["do_resize"]:  # frames decoded from a file arrive already at this size (see `_decode`)
                h, w = self._target_size(x.shape[2], x.shape[3], x.shape[0], o)
                x = torch_resize(x, h, w, o["resample"])
            normalize = lambda v: torch_rescale_normalize(  # noqa: E731
                v, o["do_rescale"], o["rescale_factor"], o["do_normalize"], o["image_mean"], o["image_std"])
            if x.dtype == torch.uint8 and x.device.type == "cpu":  # table path: bit-identical, no float copy
                patches, grid = lut_patchify(x.numpy(), channel_lut(normalize, x.shape[1], as_torch=True),
                                             o["patch_size"], o["merge_size"], T)
                patches = torch.from_numpy(patches)
            else:
                patches, grid = patchify(normalize(x), o["patch_size"], o["merge_size"], T)
            all_patches.append(patches)
            grids.append(grid)
            out_meta.append(meta)
        data = {"pixel_values_videos": all_patches[0] if len(all_patches) == 1 else torch.cat(all_patches, 0),
                "video_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        out = BatchFeature(data, tensor_type=o["return_tensors"])
        if o["return_metadata"]:
            out["video_metadata"] = out_meta
        return out

    preprocess = __call__

    @staticmethod
    def _max_pixels(o: dict, nframes: int) -> float:
        max_px, min_px = o["size"]["longest_edge"], o["size"]["shortest_edge"]
        if o["total_pixels"]:
            return max(min(max_px, o["total_pixels"] / nframes * o["temporal_patch_size"]), int(1.05 * min_px))
        if o["cap_pixels_per_frame"]:  # the reference's opt-in per-frame cap
            factor = o["patch_size"] * o["merge_size"]
            total = int(o["max_video_tokens"] * factor * factor * 0.9)
            return max(min(max_px, total * o["temporal_patch_size"] // nframes), int(min_px * 1.05))
        return max_px

    def _target_size(self, height: int, width: int, nframes: int, o: dict) -> tuple[int, int]:
        return smart_resize(height, width, o["patch_size"] * o["merge_size"], o["size"]["shortest_edge"],
                            self._max_pixels(o, nframes))

    def _decode_file(self, entry: Any, indices_for: Callable, o: dict) -> tuple[np.ndarray, VideoMetadata]:
        """Decode a video file, resizing each kept frame to the target size as soon as it is decoded, so memory
        holds resized frames only. The target is known before decoding (header size + number of sampled frames),
        which is also when `media_limits.max_vision_tokens` is checked. Resizing one frame at a time gives the
        same bytes as resizing the stack (same per-plane kernel), and the later resize is then a no-op."""
        limits: MediaLimits | None = o["media_limits"]
        on_cpu = o["device"] is None or torch.device(o["device"]).type == "cpu"
        target: list[tuple[int, int]] = []

        def plan(meta: VideoMetadata) -> list[int]:
            indices = indices_for(meta)
            h, w = meta.height, meta.width
            if o["do_resize"]:
                h, w = self._target_size(h, w, len(indices), o)
            target[:] = [(h, w)] if o["do_resize"] and on_cpu else []
            budget = limits.max_vision_tokens if limits is not None else None
            p, m = o["patch_size"], o["merge_size"]
            tokens = math.ceil(len(indices) / o["temporal_patch_size"]) * (h // p) * (w // p) // (m * m)
            if budget is not None and tokens > budget:
                raise ValueError(f"{len(indices)} frames of {w}x{h} need {tokens} tokens, over the {budget} "
                                 "this request has left; sample fewer frames (fps / num_frames) or lower max_pixels.")
            return indices

        def resize(frame: np.ndarray) -> np.ndarray:  # (H, W, 3) uint8 -> (h, w, 3) uint8
            if not target or frame.shape[:2] == target[0] or frame.ndim != 3:
                return frame
            x = torch_resize(torch.from_numpy(frame).permute(2, 0, 1)[None], *target[0], o["resample"])
            return x[0].permute(1, 2, 0).numpy()

        return load_video(entry, sample_indices_fn=plan, limits=limits, frame_fn=resize)

    def _decode(self, entry: Any, meta: VideoMetadata | None, indices_for: Callable, o: dict
                ) -> tuple[list[np.ndarray], VideoMetadata]:
        """Entry -> (sampled (C,H,W) frames, metadata with frames_indices)."""
        limits: MediaLimits | None = o["media_limits"]
        if isinstance(entry, (str, Path, bytes, bytearray)):
            video, meta = self._decode_file(entry, indices_for, o)
            return [to_chw_array(f, o["do_convert_rgb"], "channels_last") for f in video], meta
        if isinstance(entry, (np.ndarray, torch.Tensor)):
            first = entry[0].detach().cpu().numpy() if isinstance(entry, torch.Tensor) else entry[0]
            fmt = "channels_first" if _channels_first(first, o["input_data_format"]) else "channels_last"
            frames: list[Any] = list(entry)
        else:
            frames = [load_image(f, limits=limits) if isinstance(f, str) else f for f in entry]
            fmt = o["input_data_format"]
        n = len(frames)
        if n == 0:
            raise ValueError("A video has no frames.")
        first_chw = to_chw_array(frames[0], o["do_convert_rgb"], fmt)
        fps = meta.fps if meta else None
        src_fps, orig, total = fps, list(range(n)), n
        if meta is not None and meta.frames_indices is not None and len(meta.frames_indices) == n:
            # The frames are already a subsample (e.g. load_video output): sample relative to their own rate and
            # report indices into the original clip.
            src_fps, orig, total = meta.sampled_fps, list(meta.frames_indices), meta.total_num_frames
        chosen = indices_for(VideoMetadata(total_num_frames=n, fps=src_fps))
        base = VideoMetadata(total_num_frames=total, fps=fps, width=first_chw.shape[2], height=first_chw.shape[1],
                             duration=total / fps if fps else None,
                             video_backend=meta.video_backend if meta else None,
                             frames_indices=[orig[i] for i in chosen])
        chw = [to_chw_array(frames[i], o["do_convert_rgb"], fmt) for i in chosen]
        if any(f.shape != chw[0].shape for f in chw):
            raise ValueError("All frames of a video must have the same size and channel count.")
        return chw, base

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int,
                                 videos_kwargs: dict | None = None) -> int:
        """Patches for a video of this size (ceil(F/T)*gh*gw; ignores total_pixels like the reference)."""
        gh, gw = number_of_patches(height, width, self, videos_kwargs)
        t = (videos_kwargs or {}).get("temporal_patch_size") or self.temporal_patch_size
        return math.ceil(num_frames / t) * gh * gw
