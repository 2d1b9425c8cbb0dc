"""`Qwen2VLImageProcessorPil`: the PIL/numpy image processor, numerically identical to the reference's.

Pipeline per image: RGB conversion -> PIL `Image.resize(BICUBIC)` on uint8 -> numpy rescale (float64 multiply,
float32 result) -> normalize in float32 -> patchify. Outputs numpy arrays unless `return_tensors="pt"`.
Same options, size handling and (de)serialisation as the torch-backend `Qwen2VLImageProcessor`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .batch_feature import BatchFeature
from .image_processing import (
    ProcessorConfigMixin,
    flatten_images,
    number_of_patches,
    patchify,
    smart_resize,
    to_chw_array,
)


def _to_uint8_for_pil(arr: np.ndarray) -> tuple[np.ndarray, bool]:
    """Quantise a (C,H,W) array to uint8 for PIL; returns (array, was_scaled_from_[0,1]).

    Mirrors the reference: integer-valued data in [0, 255] is cast; other floats must lie in [0, 1] and are
    scaled by 255 and *truncated* (not rounded); the resized result is later scaled back by 1/255.
    """
    if arr.dtype == np.uint8:
        return arr, False
    if np.allclose(arr, arr.astype(int)):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"Image values must lie in [0, 255] to be resized with PIL, got "
                             f"[{arr.min()}, {arr.max()}].")
        return arr.astype(np.uint8), False
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"Non-integer image values must lie in [0, 1] to be resized with PIL, got "
                         f"[{arr.min()}, {arr.max()}].")
    return (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True


def pil_resize(arr: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """(C,H,W) -> (C,height,width) through `PIL.Image.resize`; float inputs come back as float32."""
    quantised, scaled = _to_uint8_for_pil(arr)
    hwc = np.ascontiguousarray(quantised.transpose(1, 2, 0))
    pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    out = np.asarray(pil.resize((width, height), resample=resample))
    out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


class Qwen2VLImageProcessorPil(ProcessorConfigMixin):
    """PIL-backend image processor (exact parity with the reference `Qwen2VLImageProcessorPil`).

    Call: `proc(images, min_pixels=None, max_pixels=None, size=None, return_tensors=None, **options)`.
    """

    call_only_keys = ("return_tensors", "input_data_format", "media_limits")

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        o = self._options(kwargs)
        factor = o["patch_size"] * o["merge_size"]
        all_patches, grids = [], []
        for image in flatten_images(images, o["media_limits"]):
            arr = to_chw_array(image, o["do_convert_rgb"], o["input_data_format"])
            if o["do_resize"]:
                h, w = smart_resize(arr.shape[1], arr.shape[2], factor, o["size"]["shortest_edge"],
                                    o["size"]["longest_edge"])
                arr = pil_resize(arr, h, w, o["resample"])
            if o["do_rescale"]:
                # float64 multiply then float32, exactly as the reference rescale does
                arr = (arr.astype(np.float64) * o["rescale_factor"]).astype(np.float32)
            if o["do_normalize"]:
                if not np.issubdtype(arr.dtype, np.floating):
                    arr = arr.astype(np.float32)
                if len(o["image_mean"]) != arr.shape[0]:
                    raise ValueError(f"image_mean/std have {len(o['image_mean'])} values but the image has "
                                     f"{arr.shape[0]} channels.")
                mean = np.asarray(o["image_mean"], dtype=arr.dtype)[:, None, None]
                std = np.asarray(o["image_std"], dtype=arr.dtype)[:, None, None]
                arr = (arr - mean) / std
            frames = np.asarray(arr, dtype=np.float32)[None]
            patches, grid = patchify(frames, o["patch_size"], o["merge_size"], o["temporal_patch_size"])
            all_patches.append(patches)
            grids.append(grid)
        if not all_patches:
            raise ValueError("No images given (empty list).")
        pixels = all_patches[0] if len(all_patches) == 1 else np.concatenate(all_patches, 0)
        data = {"pixel_values": pixels, "image_grid_thw": np.array(grids, dtype=np.int64)}
        return BatchFeature(data, tensor_type=o["return_tensors"])

    preprocess = __call__

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Patches (before merging; LLM tokens = patches / merge_size**2) for an image of this size."""
        gh, gw = number_of_patches(height, width, self, images_kwargs)
        return gh * gw
