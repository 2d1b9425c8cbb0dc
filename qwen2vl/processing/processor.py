"""`Qwen2VLProcessor`: tokenizer + image/video processors + chat template, behaving like transformers' (REFERENCE §7).

`__call__` validates placeholder/media counts, expands each `<|image_pad|>` / `<|video_pad|>` to
`t*h*w / merge_size²` copies (k-th placeholder of the flattened batch ↔ k-th image/video), tokenizes, refuses
truncation that cuts placeholders, and returns a `BatchFeature` with `input_ids, attention_mask, mm_token_type_ids`
(+ `pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw` when media are given). Flat kwargs are
routed by name: tokenizer options to the tokenizer, processor options to whichever of the image/video processors
accepts them (both for shared ones such as `max_pixels`, as transformers does).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..model_files import resolve_name
from . import media
from .chat_template import apply_chat_template
from .batch_feature import BatchFeature
from .image_processing import Qwen2VLImageProcessor, smart_resize
from .image_processing_pil import Qwen2VLImageProcessorPil
from .tokenizer import Qwen2TokenizerFast, resolve_pretrained_dir

from .video_processing import Qwen2VLVideoProcessor, flatten_videos, sample_frame_indices

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
CHAT_TEMPLATE_FILE = "chat_template.json"
TEXT_KEYS = {"padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask",
             "add_special_tokens", "split_special_tokens"}
TOKENIZER_INIT_KEYS = {"padding_side", "truncation_side", "model_max_length", "split_special_tokens"}
# Accepted for transformers compatibility and ignored (the outputs they ask for are always / never produced).
IGNORED_KEYS = {"return_mm_token_type_ids", "return_token_type_ids", "return_metadata", "verbose"}
# qwen-vl-utils bounds for `resized_height`/`resized_width` (its IMAGE_FACTOR / MIN_PIXELS / MAX_PIXELS).
_QVU_MIN_PIXELS, _QVU_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28


def _processor_keys(proc: Any, init: bool = False) -> set[str]:
    """Option names a sub-processor accepts (call time, or constructor when `init`)."""
    if proc is None:
        return set()
    keys = set(getattr(proc, "defaults", {})) | {"size", "min_pixels", "max_pixels"}
    return keys if init else keys | set(getattr(proc, "call_only_keys", ())) | set(getattr(proc, "call_keys", ()))


def _flatten_images(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


class Qwen2VLProcessor:
    """Wraps a Qwen2-VL image processor, video processor and tokenizer into a single processor."""

    attributes = ["image_processor", "tokenizer", "video_processor"]
    image_token, video_token = IMAGE_TOKEN, VIDEO_TOKEN
    model_input_names = ["pixel_values", "image_grid_thw", "input_ids", "attention_mask", "pixel_values_videos",
                         "video_grid_thw", "mm_token_type_ids"]

    def __init__(self, image_processor: Any = None, tokenizer: Qwen2TokenizerFast | None = None,
                 video_processor: Any = None, chat_template: str | None = None,
                 media_limits: media.MediaLimits | None = None, **kwargs):
        if tokenizer is None:
            raise ValueError("Qwen2VLProcessor needs a tokenizer.")
        if kwargs:
            raise ValueError(f"Qwen2VLProcessor: unexpected argument(s) {sorted(kwargs)}.")
        self.image_processor, self.tokenizer, self.video_processor = image_processor, tokenizer, video_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        if self.image_token_id is None or self.video_token_id is None:
            raise ValueError(f"The tokenizer has no {IMAGE_TOKEN} / {VIDEO_TOKEN} tokens; it is not a Qwen2-VL tokenizer.")
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.media_limits = media_limits  # default restrictions for sources named in chat messages / text calls

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, backend: str | None = None,
                        use_fast: bool | None = None, media_limits: media.MediaLimits | None = None,
                        revision: str | None = None, cache_dir: str | None = None, token: str | None = None,
                        local_files_only: bool = False, chat_template: str | None = None,
                        **overrides) -> "Qwen2VLProcessor":
        """Load from a checkpoint directory, hub id or "qwen2vl-demo" (the bundled demo model).

        `overrides` go to the tokenizer (`padding_side`, `truncation_side`, `model_max_length`) or to the image and
        video processors (`min_pixels`, `max_pixels`, `size`, ..., each processor taking the names it knows).
        `backend="pil"` (or `use_fast=False`) picks the PIL image processor, default is the torch one.
        """
        # "qwen2vl-demo" -> the bundled model's folder, as for the model
        path = resolve_pretrained_dir(resolve_name(name_or_path), ["*.json", "*.txt", "*.jinja"], revision=revision,
                                      cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        if backend is None:
            backend = "pil" if use_fast is False else "torch"
        if backend not in ("torch", "torchvision", "pil"):
            raise ValueError(f"backend must be 'torch' or 'pil', got {backend!r}.")
        image_cls = Qwen2VLImageProcessorPil if backend == "pil" else Qwen2VLImageProcessor
        tok_kw = {k: overrides.pop(k) for k in list(overrides) if k in TOKENIZER_INIT_KEYS}
        image_keys = _processor_keys(image_cls, init=True)
        video_keys = _processor_keys(Qwen2VLVideoProcessor, init=True)
        unknown = set(overrides) - image_keys - video_keys
        if unknown:
            raise ValueError(f"Qwen2VLProcessor.from_pretrained: unknown option(s) {sorted(unknown)}.")
        tokenizer = Qwen2TokenizerFast.from_pretrained(path, **tok_kw)
        image_processor = image_cls.from_pretrained(path, **{k: v for k, v in overrides.items() if k in image_keys})
        video_processor = Qwen2VLVideoProcessor.from_pretrained(
            path, **{k: v for k, v in overrides.items() if k in video_keys})
        if chat_template is None:
            chat_template = _read_chat_template(path)
        return cls(image_processor, tokenizer, video_processor, chat_template=chat_template, media_limits=media_limits)

    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> list[str]:
        """preprocessor_config.json, video_preprocessor_config.json, chat_template.json and the tokenizer files."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        for proc in (self.image_processor, self.video_processor, self.tokenizer):
            if proc is not None:
                files += list(proc.save_pretrained(out))
        if self.chat_template is not None:
            (out / CHAT_TEMPLATE_FILE).write_text(json.dumps({"chat_template": self.chat_template}, indent=2,
                                                             ensure_ascii=False) + "\n", encoding="utf-8")
            files.append(str(out / CHAT_TEMPLATE_FILE))
        return files

    # ------------------------------------------------------------------ kwargs routing
    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict, dict]:
        text_kw = dict(kwargs.pop("text_kwargs", None) or {})
        image_kw = dict(kwargs.pop("images_kwargs", None) or {})
        video_kw = dict(kwargs.pop("videos_kwargs", None) or {})
        if "video_fps" in kwargs:  # older docs/tests name it video_fps
            kwargs.setdefault("fps", kwargs.pop("video_fps"))
        image_keys, video_keys = _processor_keys(self.image_processor), _processor_keys(self.video_processor)
        unknown = []
        for key, value in kwargs.items():
            if key in TEXT_KEYS:
                text_kw.setdefault(key, value)
                continue
            if key in image_keys:
                image_kw.setdefault(key, value)
            if key in video_keys:
                video_kw.setdefault(key, value)
            if key not in image_keys | video_keys and key not in IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            raise ValueError(f"Qwen2VLProcessor: unexpected keyword argument(s) {sorted(unknown)}.")
        for kw in (text_kw, image_kw, video_kw):  # one return_tensors, applied to the whole output
            kw.pop("return_tensors", None)
        if video_kw.get("fps") is not None and video_kw.get("num_frames") is not None:
            raise ValueError("`fps` and `num_frames` are mutually exclusive arguments, please use only one!")
        return text_kw, image_kw, video_kw

    # ------------------------------------------------------------------ main call
    def __call__(self, images: Any = None, text: str | list[str] | None = None, videos: Any = None, *,
                 return_tensors: str | None = None, media_limits: media.MediaLimits | None = None,
                 per_image_kwargs: list[dict | None] | None = None,
                 per_video_kwargs: list[dict | None] | None = None, **kwargs) -> BatchFeature:
        """Prepare text (+ images/videos) for the model.

        `per_image_kwargs` / `per_video_kwargs` (one dict or None per flattened item) override processing options
        for single items (`min_pixels`, `max_pixels`, `resized_height`, `resized_width`, video `fps`/`num_frames`),
        as qwen-vl-utils allows in chat messages. `media_limits` restricts sources given as strings/bytes.
        """
        if images is None and text is None and videos is None:
            raise ValueError(f"You need to provide at least one input to call {type(self).__name__}")
        texts = None
        if text is not None:
            if isinstance(text, str):
                texts = [text]
            elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
                texts = list(text)
            else:
                raise ValueError("`text` must be a string or list of strings.")
        text_kw, image_kw, video_kw = self._split_kwargs(dict(kwargs))
        flat_images = _flatten_images(images) if images is not None else []
        flat_videos = flatten_videos(videos) if videos is not None else []
        if texts is not None:
            self._check_counts(texts, IMAGE_TOKEN, len(flat_images), images is not None, "images")
            self._check_counts(texts, VIDEO_TOKEN, len(flat_videos), videos is not None, "videos")
        limits = media_limits or self.media_limits
        data: dict[str, Any] = {}
        image_counts: list[int] = []
        video_counts: list[int] = []
        if flat_images:
            if self.image_processor is None:
                raise ValueError("This processor has no image processor; images cannot be processed.")
            flat_images = [media.load_image(im, limits=limits) if isinstance(im, (str, Path, bytes, bytearray))
                           else im for im in flat_images]
            data["pixel_values"], data["image_grid_thw"] = self._run_items(
                self.image_processor, flat_images, image_kw, per_image_kwargs, "pixel_values", "image_grid_thw",
                _resize_image_exactly)
            image_counts = self._token_counts(data["image_grid_thw"], self.image_processor)
        if flat_videos:
            if self.video_processor is None:
                raise ValueError("This processor has no video processor; videos cannot be processed.")
            if limits is not None and "media_limits" in _processor_keys(self.video_processor):
                video_kw["media_limits"] = limits  # the video processor decodes sources itself
            data["pixel_values_videos"], data["video_grid_thw"] = self._run_items(
                self.video_processor, flat_videos, video_kw, per_video_kwargs, "pixel_values_videos",
                "video_grid_thw", _resize_video_exactly)
            video_counts = self._token_counts(data["video_grid_thw"], self.video_processor)
        if texts is None:
            return BatchFeature(data, tensor_type=return_tensors)
        texts = self._expand_placeholders(texts, image_counts, video_counts)
        enc = self.tokenizer(texts, return_tensors=return_tensors, **text_kw)
        ids = enc["input_ids"]
        ids_list = ids.tolist() if hasattr(ids, "tolist") else ids
        for name, token, token_id in (("image", IMAGE_TOKEN, self.image_token_id),
                                      ("video", VIDEO_TOKEN, self.video_token_id)):
            in_ids = [list(row).count(token_id) for row in ids_list]
            in_text = [t.count(token) for t in texts]
            if in_ids != in_text:
                raise ValueError(f"Mismatch in `{name}` token count between text and `input_ids`. Got ids={in_ids} "
                                 f"and text={in_text}. Likely due to `truncation='max_length'`. Please disable "
                                 "truncation or increase `max_length`.")
        mm = [[1 if i == self.image_token_id else 2 if i == self.video_token_id else 0 for i in row] for row in ids_list]
        out = {"input_ids": ids, "attention_mask": enc.get("attention_mask"), "mm_token_type_ids": mm, **data}
        return BatchFeature({k: v for k, v in out.items() if v is not None}, tensor_type=return_tensors)

    @staticmethod
    def _check_counts(texts: list[str], token: str, n_media: int, given: bool, what: str) -> None:
        n_text = sum(t.count(token) for t in texts)
        if given and n_text != n_media:
            raise ValueError(f"The total number of {token} tokens in the prompts should be the same as the number of "
                             f"{what} passed. Found total {n_text} {token} tokens and {n_media} {what}.")
        if not given and n_text:
            raise ValueError(f"Found {n_text} {token} tokens in the text but no {what} were passed.")

    @staticmethod
    def _token_counts(grid: torch.Tensor, proc: Any) -> list[int]:
        merge = int(getattr(proc, "merge_size", 2))
        return [int(n) // merge**2 for n in torch.as_tensor(grid).prod(-1).tolist()]

    @staticmethod
    def _expand_placeholders(texts: list[str], image_counts: list[int], video_counts: list[int]) -> list[str]:
        """k-th placeholder of the flattened batch → k-th item's token count (images and videos independently)."""
        counts = {IMAGE_TOKEN: iter(image_counts), VIDEO_TOKEN: iter(video_counts)}
        pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
        return [pattern.sub(lambda m: m.group(0) * next(counts[m.group(0)]), t) for t in texts]

    @staticmethod
    def _run_items(proc: Any, items: list, common: dict, per_item: list | None, values_key: str, grid_key: str,
                   exact_resize) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched call, or one call per item when per-item options are given (results concatenated)."""
        if per_item is not None and len(per_item) != len(items):
            raise ValueError(f"per-item options: got {len(per_item)} entries for {len(items)} items.")
        if not per_item or not any(per_item):
            out = proc(items, return_tensors="pt", **common)
            return out[values_key], out[grid_key]
        values, grids = [], []
        for item, extra in zip(items, per_item):
            extra = extra or {}
            kw = {**common, **extra}
            for a, b in (("fps", "num_frames"), ("num_frames", "fps")):
                if extra.get(a) is not None and b not in extra:  # an item's own sampling rule replaces the call's
                    kw.pop(b, None)
            if "resized_height" in kw or "resized_width" in kw:
                item, kw = exact_resize(proc, item, kw)
            out = proc([item], return_tensors="pt", **kw)
            values.append(out[values_key])
            grids.append(out[grid_key])
        return torch.cat(values, 0), torch.cat(grids, 0)

    # ------------------------------------------------------------------ decoding / helpers
    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str | list[str]:
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True,
                                        clean_up_tokenization_spaces: bool = False, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens,
                                           clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def get_num_multimodal_tokens(self, image_sizes: list | None = None, video_sizes: list | None = None,
                                  **kwargs) -> dict[str, list[int]]:
        """Placeholder counts for images `(h, w)` / videos `(frames, h, w)` without processing any pixels."""
        _, image_kw, video_kw = self._split_kwargs(dict(kwargs))
        out: dict[str, list[int]] = {}
        if image_sizes is not None:
            merge = image_kw.get("merge_size") or self.image_processor.merge_size
            patches = [self.image_processor.get_number_of_image_patches(h, w, image_kw) for h, w in image_sizes]
            out.update(num_image_tokens=[p // merge**2 for p in patches], num_image_patches=patches)
        if video_sizes is not None:
            vp = self.video_processor
            merge = video_kw.get("merge_size") or vp.merge_size
            patches = [vp.get_num_of_video_patches(f, h, w, video_kw) for f, h, w in video_sizes]
            out["num_video_tokens"] = [p // merge**2 for p in patches]
        return out

    _get_num_multimodal_tokens = get_num_multimodal_tokens

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Render (and optionally tokenize + process media of) conversations; see `chat_template.apply`."""
        return apply_chat_template(self, conversation, chat_template=chat_template, **kwargs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{a}={type(getattr(self, a)).__name__}" for a in self.attributes)
        return f"{type(self).__name__}({parts})"


def _exact_size(proc: Any, kw: dict) -> tuple[int, int]:
    """qwen-vl-utils `resized_height/width`: rounded to patch*merge multiples within its pixel bounds."""
    rh, rw = kw.pop("resized_height", None), kw.pop("resized_width", None)
    if rh is None or rw is None:
        raise ValueError("resized_height and resized_width must be given together.")
    factor = int(kw.get("patch_size") or proc.patch_size) * int(kw.get("merge_size") or proc.merge_size)
    return smart_resize(int(rh), int(rw), factor, _QVU_MIN_PIXELS, _QVU_MAX_PIXELS)


def _pinned(kw: dict, h: int, w: int) -> dict:
    """Options under which smart_resize keeps an (h, w) image whose sides are already factor multiples."""
    kw = {k: v for k, v in kw.items() if k not in ("size", "total_pixels")}
    return {**kw, "min_pixels": h * w, "max_pixels": h * w}


def _resize_image_exactly(proc: Any, image: Any, kw: dict) -> tuple[Any, dict]:
    h, w = _exact_size(proc, kw)
    return media.load_image(image).resize((w, h), Image.BICUBIC), _pinned(kw, h, w)


def _resize_video_exactly(proc: Any, video: Any, kw: dict) -> tuple[Any, dict]:
    """Sample (when asked) and decode first, then resize the kept frames to exactly the requested size."""
    h, w = _exact_size(proc, kw)
    fps, num_frames = kw.pop("fps", None), kw.pop("num_frames", None)
    sample = kw.pop("do_sample_frames", None)
    sample = sample if sample is not None else (fps is not None or num_frames is not None or proc.do_sample_frames)
    if isinstance(video, (str, Path, bytes, bytearray)):
        def indices(meta: media.VideoMetadata) -> list[int]:
            if not sample:
                return list(range(meta.total_num_frames))
            return sample_frame_indices(
                meta.total_num_frames, meta.fps, fps=fps if fps is not None else proc.fps,
                num_frames=num_frames if num_frames is not None else proc.num_frames,
                min_frames=kw.get("min_frames") or proc.min_frames, max_frames=kw.get("max_frames") or proc.max_frames,
                temporal_patch_size=kw.get("temporal_patch_size") or proc.temporal_patch_size)
        video, _ = media.load_video(video, sample_indices_fn=indices, limits=kw.get("media_limits"))
        kw["do_sample_frames"] = False
    else:  # frame arrays/lists: the processor samples after our resize
        kw.update({"fps": fps, "num_frames": num_frames, "do_sample_frames": sample})
    if isinstance(video, tuple):  # (frames, metadata)
        video = video[0]
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.shape[-1] not in (1, 3, 4):
        video = np.moveaxis(np.asarray(video), 1, -1)  # (F, C, H, W) -> (F, H, W, C)
    frames = [media.load_image(f, limits=kw.get("media_limits")).resize((w, h), Image.BICUBIC) for f in video]
    return frames, _pinned(kw, h, w)


def _read_chat_template(path: Path) -> str | None:
    if (path / CHAT_TEMPLATE_FILE).exists():
        return json.loads((path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"))["chat_template"]
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    return None


class AutoProcessor:
    """`AutoProcessor.from_pretrained(path_or_hub_id, **overrides)` → `Qwen2VLProcessor`."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs) -> Qwen2VLProcessor:
        return Qwen2VLProcessor.from_pretrained(name_or_path, **kwargs)
