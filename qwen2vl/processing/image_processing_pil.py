"""`Qwen2VLImageProcessorPil`: the PIL/numpy image processor, numerically identical to the reference's.

Pipeline per image: RGB conversion -> PIL `Image.resize(BICUBIC)` on uint8 -> numpy rescale (float64 multiply,
float32 result) -> normalize in float32 -> patchify. Outputs numpy arrays unless `return_tensors="pt"`.
For uint8 pixels the rescale/normalize arithmetic is evaluated once per (channel, value) and gathered while
patchifying (`patchify.lut_patchify`), which is bit-identical and avoids the float64/float32 intermediates.
Same options, size handling and (de)serialisation as the torch-backend `Qwen2VLImageProcessor`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .batch_feature import BatchFeature
from .image_processing import flatten_images, number_of_patches, smart_resize, to_chw_array
from .media import to_rgb
from .patchify import assemble, channel_lut, lut_patchify, patchify
from .processor_config import ProcessorConfigMixin


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
        p, m, t = o["patch_size"], o["merge_size"], o["temporal_patch_size"]
        items = []  # uint8 (C, h, w) arrays (table path) or finished (patches, grid) for float data
        for image in flatten_images(images, o["media_limits"]):
            arr = self._resized(image, o)
            if arr.dtype == np.uint8:
                items.append(arr)
            else:
                items.append(patchify(self._normalize(arr, o)[None], p, m, t))
        luts: dict[int, np.ndarray] = {}

        def fill(item: Any, out: np.ndarray | None) -> tuple[Any, tuple]:
            if isinstance(item, tuple):
                if out is not None:
                    out[...] = item[0]
                return item
            c = item.shape[0]
            if c not in luts:  # the reference arithmetic run on 0..255: bit-identical to running it per pixel
                luts[c] = channel_lut(lambda ramp: self._normalize(ramp, o), c)
            return lut_patchify(item[None], luts[c], p, m, t, out=out)

        pixels, grids = assemble(items, fill, p, m, t)
        data = {"pixel_values": pixels, "image_grid_thw": np.array(grids, dtype=np.int64)}
        return BatchFeature(data, tensor_type=o["return_tensors"])

    @staticmethod
    def _resized(image: Any, o: dict) -> np.ndarray:
        """One image -> (C, h, w) array after RGB conversion and PIL resizing (uint8 unless float data)."""
        factor, size = o["patch_size"] * o["merge_size"], o["size"]
        if isinstance(image, Image.Image) and o["do_convert_rgb"]:
            # Resize the RGB PIL image itself: the same pixels as the reference's array -> PIL -> resize round
            # trip, without the two extra conversions.
            rgb = image if image.mode == "RGB" and "transparency" not in image.info else to_rgb(image)
            if o["do_resize"] and rgb.width and rgb.height:
                h, w = smart_resize(rgb.height, rgb.width, factor, size["shortest_edge"], size["longest_edge"])
                rgb = rgb.resize((w, h), resample=o["resample"])
            return to_chw_array(rgb, False)
        arr = to_chw_array(image, o["do_convert_rgb"], o["input_data_format"])
        if o["do_resize"]:
            h, w = smart_resize(arr.shape[1], arr.shape[2], factor, size["shortest_edge"], size["longest_edge"])
            arr = pil_resize(arr, h, w, o["resample"])
        return arr

    @staticmethod
    def _normalize(arr: np.ndarray, o: dict) -> np.ndarray:
        """The reference's rescale (float64 multiply, float32 result) then normalize (float32); float32 out."""
        if o["do_rescale"]:
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
        return np.asarray(arr, dtype=np.float32)

    preprocess = __call__

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Patches (before merging; LLM tokens = patches / merge_size**2) for an image of this size."""
        gh, gw = number_of_patches(height, width, self, images_kwargs)
        return gh * gw
