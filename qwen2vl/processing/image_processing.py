"""Qwen2-VL image processor (torch backend), `smart_resize`, and the pieces shared with the PIL and video processors
(their options and config files: `processor_config`).

Output contract (all processors): `pixel_values (N, C*T*p*p)` float32 with rows in merge-block-major order
`(t, bh, bw, ih, iw)` and columns `(C, T, y, x)`; `image_grid_thw (n, 3)` int64 in patch units. Images are
duplicated to T=temporal_patch_size frames. `size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`
holds *pixel counts* (the reference's misnomer), and is the single source of truth for `min_pixels`/`max_pixels`.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .batch_feature import BatchFeature
from .media import load_image, to_rgb
from .patchify import (  # noqa: F401  (patchify/torch_resize re-exported for callers of this module)
    assemble, channel_lut, lut_patchify, patchify, torch_rescale_normalize, torch_resize)
from .processor_config import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessorConfigMixin,  # noqa: F401
                               resolve_config_file, resolve_size)

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Target (height, width): both multiples of `factor`, area in [min_pixels, max_pixels], aspect kept.

    Bit-exact with the reference: Python's banker's `round` first, `floor` when shrinking, `ceil` when growing,
    all computed from the original size.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize needs a positive size, got height={height}, width={width}.")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def flatten_images(images: Any, limits: Any = None) -> list[Any]:
    """Flatten (nested) lists / 4-D batches into single images; strings, paths and bytes go through load_image."""
    if images is None:
        raise ValueError("No images given (images=None).")
    if isinstance(images, (list, tuple)):
        return [img for item in images for img in flatten_images(item, limits)]
    if isinstance(images, (str, Path, bytes, bytearray)):
        return [load_image(images, limits=limits)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        return [images]
    raise ValueError(f"Unsupported image input of type {type(images).__name__}; expected PIL images, arrays, "
                     "tensors, paths/URLs/base64 strings, or (nested) lists of them.")


def _channels_first(arr: np.ndarray, input_data_format: str | None) -> bool:
    fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format))
    if fmt in ("channels_first", "first"):
        return True
    if fmt in ("channels_last", "last"):
        return False
    if fmt is not None:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}.")
    if arr.shape[0] in (1, 3, 4):  # ambiguous shapes count as channels-first, like the reference
        return True
    if arr.shape[-1] in (1, 3, 4):
        return False
    raise ValueError(f"Cannot infer the channel dimension of an image with shape {arr.shape}; expected 1, 3 "
                     "or 4 channels first or last (or pass input_data_format).")


def to_chw_array(image: Any, do_convert_rgb: bool = True, input_data_format: str | None = None) -> np.ndarray:
    """One image -> (C,H,W) numpy array (uint8, or float for float inputs), RGB when `do_convert_rgb`.

    PIL images keep their mode semantics (alpha composited on white, palettes expanded); arrays with 1 channel
    are repeated to 3 and 4-channel arrays composited on white, both like the reference.
    """
    if isinstance(image, Image.Image):
        if do_convert_rgb and not (image.mode == "RGB" and "transparency" not in image.info):
            image = to_rgb(image)  # (an RGB image without a colour key is already what to_rgb returns)
        arr = np.asarray(image)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    else:
        if isinstance(image, torch.Tensor):  # numpy has no bfloat16: widen half types first
            t = image.detach().cpu()
            image = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
        elif isinstance(image, np.ndarray) and image.dtype == np.float16:
            image = image.astype(np.float32)
        if not isinstance(image, np.ndarray):
            raise ValueError(f"Unsupported image type {type(image).__name__}.")
        if image.ndim == 2:
            arr = image[None]
        elif image.ndim == 3:
            arr = image if _channels_first(image, input_data_format) else np.moveaxis(image, -1, 0)
        else:
            raise ValueError(f"An image must have 2 or 3 dimensions, got shape {tuple(image.shape)}.")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"Unsupported image dtype {arr.dtype}.")
        if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"Integer images must hold values in [0, 255], got [{arr.min()}, {arr.max()}].")
            arr = arr.astype(np.uint8)
        if do_convert_rgb and arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        elif do_convert_rgb and arr.shape[0] == 4:
            floating = np.issubdtype(arr.dtype, np.floating)
            if floating and arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ValueError("A float RGBA image must hold values in [0, 1] to be composited on white.")
            white = 1.0 if floating else 255
            alpha = arr[3:4] / white
            rgb = alpha * arr[:3] + (1 - alpha) * white
            arr = rgb.astype(arr.dtype) if floating else np.round(rgb).astype(np.uint8)
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"Image has zero size: {arr.shape[2]}x{arr.shape[1]}.")
    return arr


def number_of_patches(height: int, width: int, defaults: ProcessorConfigMixin,
                      kwargs: dict | None) -> tuple[int, int]:
    kwargs = kwargs or {}
    size = resolve_size(kwargs.get("size"), kwargs.get("min_pixels"), kwargs.get("max_pixels"), defaults.size)
    p, m = kwargs.get("patch_size") or defaults.patch_size, kwargs.get("merge_size") or defaults.merge_size
    h, w = smart_resize(height, width, p * m, size["shortest_edge"], size["longest_edge"])
    return h // p, w // p


class Qwen2VLImageProcessor(ProcessorConfigMixin):
    """Torch-backend image processor (no torchvision needed); `device=` runs resize/normalize there.

    Call: `proc(images, min_pixels=None, max_pixels=None, size=None, return_tensors=None, **options)`.
    Returns torch tensors (also for return_tensors=None); "np" gives numpy.
    """

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        o = self._options(kwargs)
        if o["device"] is not None and torch.device(o["device"]).type != "cpu":
            return self._call_on_device(images, o)
        p, m, t = o["patch_size"], o["merge_size"], o["temporal_patch_size"]
        items = []  # uint8 (C, h, w) arrays (table path) or finished float patches (float inputs)
        for image in flatten_images(images, o["media_limits"]):
            arr = to_chw_array(image, o["do_convert_rgb"], o["input_data_format"])
            if arr.dtype == np.uint8:
                items.append(self._resized(arr, o))
            else:
                items.append(self._float_patches(torch.from_numpy(np.ascontiguousarray(arr)), o))
        luts: dict[int, np.ndarray] = {}

        def fill(item: Any, out: np.ndarray | None) -> tuple[Any, tuple]:
            if isinstance(item, tuple):  # (patches, grid) from the float path
                if out is not None:
                    out[...] = item[0].numpy()
                return item
            c = item.shape[0]
            if c not in luts:
                luts[c] = channel_lut(lambda r: torch_rescale_normalize(
                    r, o["do_rescale"], o["rescale_factor"], o["do_normalize"], o["image_mean"], o["image_std"]),
                    c, as_torch=True)
            return lut_patchify(item[None], luts[c], p, m, t, out=out)

        pixels, grids = assemble(items, fill, p, m, t)
        data = {"pixel_values": torch.from_numpy(pixels), "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        return BatchFeature(data, tensor_type=o["return_tensors"])

    @staticmethod
    def _resized(arr: np.ndarray, o: dict) -> np.ndarray:
        """uint8 (C,H,W) -> resized uint8 (C,h,w); HWC-backed arrays go in channels-last (the kernel's fast path)."""
        if not o["do_resize"]:
            return arr
        factor, size = o["patch_size"] * o["merge_size"], o["size"]
        h, w = smart_resize(arr.shape[1], arr.shape[2], factor, size["shortest_edge"], size["longest_edge"])
        if (h, w) == arr.shape[1:]:
            return arr
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy(order="K"))  # torch wants writable memory
        return torch_resize(x[None], h, w, o["resample"])[0].numpy()

    def _float_patches(self, x: torch.Tensor, o: dict) -> tuple[torch.Tensor, tuple]:
        """Generic path: resize, float rescale/normalize, patchify (float inputs, other devices)."""
        if x.is_floating_point() and o["do_rescale"] and x.numel() and x.max() <= 1:
            warnings.warn("Float image already in [0, 1] is being rescaled by rescale_factor again; pass "
                          "do_rescale=False for such inputs.", stacklevel=3)
        if o["do_resize"]:
            size, factor = o["size"], o["patch_size"] * o["merge_size"]
            h, w = smart_resize(x.shape[1], x.shape[2], factor, size["shortest_edge"], size["longest_edge"])
            x = torch_resize(x[None], h, w, o["resample"])[0]
        x = torch_rescale_normalize(x, o["do_rescale"], o["rescale_factor"], o["do_normalize"],
                                    o["image_mean"], o["image_std"])
        return patchify(x[None], o["patch_size"], o["merge_size"], o["temporal_patch_size"])

    def _call_on_device(self, images: Any, o: dict) -> BatchFeature:
        all_patches, grids = [], []
        for image in flatten_images(images, o["media_limits"]):
            arr = to_chw_array(image, o["do_convert_rgb"], o["input_data_format"])
            patches, grid = self._float_patches(torch.from_numpy(np.ascontiguousarray(arr)).to(o["device"]), o)
            all_patches.append(patches)
            grids.append(grid)
        if not all_patches:
            raise ValueError("No images given (empty list).")
        pixels = all_patches[0] if len(all_patches) == 1 else torch.cat(all_patches, 0)
        data = {"pixel_values": pixels, "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        return BatchFeature(data, tensor_type=o["return_tensors"])

    preprocess = __call__

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Patches (before merging; LLM tokens = patches / merge_size**2) for an image of this size."""
        gh, gw = number_of_patches(height, width, self, images_kwargs)
        return gh * gw
