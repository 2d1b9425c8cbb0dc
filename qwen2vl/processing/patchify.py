"""Resize, normalize and patchify kernels shared by the image and video processors.

Layout: `(F, C, H, W)` frames -> `((gt*gh*gw), C*T*p*p)` rows in merge-block-major order `(t, bh, bw, ih, iw)`,
columns `(C, T, y, x)` (the Conv3d patch-embed weight layout); F is padded to a multiple of T with the last frame.

Fast path for uint8 pixels (`lut_patchify`): rescale+normalize of a uint8 value depends only on (channel, value),
so it is a 256-entry table per channel, built by running the backend's *own* float arithmetic on 0..255. Gathering
from that table gives bit-identical results to running the arithmetic on every pixel, while the pixels are
permuted as uint8 (1 byte instead of 4) and each output float is written once. The gather reads pixel *pairs*
(uint16 index into a 65536-entry table of float32 pairs), halving the number of lookups.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

_TORCH_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample ids -> interpolate modes
_SLAB_ROWS = 256  # output rows per gather step: keeps the uint8 slab and the float slab in L2


def patchify(frames: Any, patch_size: int, merge_size: int, temporal_patch_size: int, *,
             via_numpy: bool | None = None) -> tuple[Any, tuple[int, int, int]]:
    """(F, C, H, W) -> ((gt*gh*gw, C*T*p*p), (gt, gh, gw)); F is padded to a multiple of T with the last frame.

    Accepts numpy arrays or torch tensors and returns the same kind. CPU data is permuted with numpy (its
    strided copy is ~4x faster than torch's for this 9-D permutation); `via_numpy=False` forces torch ops.
    """
    f, c, h, w = frames.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    gt, gh, gw, pad = _grid(f, h, w, p, m, t)
    is_torch = isinstance(frames, torch.Tensor)
    use_np = not is_torch or (frames.device.type == "cpu" if via_numpy is None else via_numpy)
    a = frames.detach().numpy() if is_torch and use_np else frames
    permute = (lambda x, dims: x.transpose(dims)) if use_np else (lambda x, dims: x.permute(*dims))
    if f == 1:  # an image: broadcast it over T instead of materialising copies first
        x = permute(a[0].reshape(c, gh // m, m, p, gw // m, m, p), (1, 4, 2, 5, 0, 3, 6))[:, :, :, :, :, None]
        shape = (*x.shape[:5], t, p, p)
        x = np.broadcast_to(x, shape) if use_np else x.expand(shape)
    else:
        if pad:
            tail = np.repeat(a[-1:], pad, 0) if use_np else a[-1:].expand(pad, -1, -1, -1)
            a = np.concatenate([a, tail]) if use_np else torch.cat([a, tail])
        x = permute(a.reshape(gt, t, c, gh // m, m, p, gw // m, m, p), (0, 3, 6, 4, 7, 2, 1, 5, 8))
    out = (np.ascontiguousarray(x) if use_np else x).reshape(gt * gh * gw, c * t * p * p)
    return (torch.from_numpy(out) if is_torch and use_np else out), (gt, gh, gw)


def _grid(f: int, h: int, w: int, p: int, m: int, t: int) -> tuple[int, int, int, int]:
    if h % (p * m) or w % (p * m):
        raise ValueError(f"Image size {h}x{w} is not a multiple of patch_size*merge_size={p * m}; "
                         "keep do_resize=True or pre-resize the input.")
    pad = -f % t
    return (f + pad) // t, h // p, w // p, pad


def channel_lut(normalize: Callable[[Any], Any], channels: int, as_torch: bool = False) -> np.ndarray:
    """(C, 256) float32 table: `normalize` (the backend's own arithmetic) applied to every uint8 value."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (channels, 1, 1))  # (C, 1, 256), writable
    out = normalize(torch.from_numpy(ramp) if as_torch else ramp)
    out = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(channels, 256)


@lru_cache(maxsize=16)
def _pair_lut(lut_bytes: bytes, channels: int) -> np.ndarray:
    """(C, 65536) table of float32 pairs (viewed as 8-byte items) indexed by two adjacent uint8 pixels."""
    lut = np.frombuffer(lut_bytes, dtype=np.float32).reshape(channels, 256)
    pairs = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(65536, 2)  # memory byte order: any endianness
    return np.ascontiguousarray(lut[:, pairs]).view(np.float64).reshape(channels, 65536)


def lut_patchify(frames: np.ndarray, lut: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 (F, C, H, W) -> (float32 patches, grid): `patchify(lut[c][frames])` without the float intermediate.

    Works slab by slab (a few merge-block rows of one temporal group): permute the uint8 slab into
    (rows, C, T', p*p), then gather each channel's values from the table into the output rows. A group made of
    one repeated frame (an image, or a padded tail) is gathered once (T'=1) and copied to the other T slots.
    `out`: optional C-contiguous float32 (rows, C*T*p*p) array to fill (e.g. a slice of a batch buffer).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError("lut_patchify needs a uint8 (F, C, H, W) array.")
    f, c, h, w = frames.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    gt, gh, gw, _ = _grid(f, h, w, p, m, t)
    bh, bw, n = gh // m, gw // m, gt * gh * gw
    if lut.shape != (c, 256):
        raise ValueError(f"image_mean/std have {lut.shape[0]} values but the image has {c} channels.")
    frames = np.ascontiguousarray(frames)
    # Each patch row of p bytes becomes one opaque item: the permutation then moves 14-byte items, not bytes.
    src = frames.view(f"V{p}").reshape(f, c, bh, m, p, bw, m)
    pairs = (p * p) % 2 == 0  # pairs of pixels never straddle a patch
    table = _pair_lut(np.ascontiguousarray(lut, dtype=np.float32).tobytes(), c) if pairs else lut
    idx_t, w1 = (np.uint16, p * p // 2) if pairs else (np.uint8, p * p)
    if out is None:
        out = np.empty((n, c * t * p * p), dtype=np.float32)
    elif out.shape != (n, c * t * p * p) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, c * t * p * p)}.")
    result, out = out, out.view(table.dtype).reshape(n, c, t, w1)
    rows_per_b = bw * m * m
    step = max(1, _SLAB_ROWS // rows_per_b)
    buf = np.empty(step * rows_per_b * t * w1, dtype=table.dtype)  # reused gather target (contiguous: unbuffered)
    for g in range(gt):
        ids = [min(i, f - 1) for i in range(g * t, (g + 1) * t)]  # pad by repeating the last frame
        single = len(set(ids)) == 1
        group = src[ids[0]:ids[0] + 1] if single else src[ids[0]:ids[0] + t] if ids[-1] - ids[0] == t - 1 \
            else src[ids]
        tg = group.shape[0]
        for b0 in range(0, bh, step):
            b1 = min(bh, b0 + step)
            # (T', C, nb, mh, py, bw, mw) -> (nb, bw, mh, mw, C, T', py): one contiguous uint8 copy
            slab = np.ascontiguousarray(group[:, :, b0:b1].transpose(2, 5, 3, 6, 1, 0, 4))
            idx = slab.view(np.uint8).view(idx_t).reshape(-1, c, tg * w1)
            r0, rows = (g * bh + b0) * rows_per_b, idx.shape[0]
            o, tmp = out[r0:r0 + rows], buf[:rows * tg * w1].reshape(rows, tg * w1)
            for ch in range(c):
                np.take(table[ch], idx[:, ch], out=tmp, mode="clip")  # uint8 indices are always in range
                o[:, ch, :tg] = tmp.reshape(rows, tg, w1)
            if tg < t:
                o[:, :, tg:] = o[:, :, :1]
    return result, (gt, gh, gw)


def assemble(items: list, fill: Any, p: int, m: int, t: int) -> tuple[np.ndarray, list[tuple]]:
    """Write every item's patches into one preallocated (N, C*T*p*p) float32 array (no concatenation copy).

    `items`: uint8 (C, h, w) arrays, or `(patches, grid)` tuples already computed; `fill(item, out)` writes one
    item into `out` (None: allocate) and returns `(patches, grid)`.
    """
    if not items:
        raise ValueError("No images given (empty list).")
    if len(items) == 1:
        patches, grid = fill(items[0], None)
        return np.asarray(patches), [grid]
    shapes = [(item[0].shape[0], item[0].shape[1]) if isinstance(item, tuple) else
              ((item.shape[1] // p) * (item.shape[2] // p), item.shape[0] * t * p * p) for item in items]
    if len({cols for _, cols in shapes}) > 1:
        raise ValueError(f"All images must give the same number of columns (channels); got {shapes}.")
    out = np.empty((sum(rows for rows, _ in shapes), shapes[0][1]), dtype=np.float32)
    grids, start = [], 0
    for item, (rows, _) in zip(items, shapes):
        grids.append(fill(item, out[start:start + rows])[1])
        start += rows
    return out, grids


def torch_resize(x: torch.Tensor, height: int, width: int, resample: int = 3) -> torch.Tensor:
    """Resize (N, C, H, W) like torchvision's `resize(..., antialias=True)`.

    torchvision resizes uint8 bicubic natively on CPU (fixed-point kernel), so we do the same there; on other
    devices and for other modes it interpolates in float32 and clamps+rounds back to uint8, as torchvision does.
    Channels-last inputs (e.g. a permuted HWC image) are fine and take the kernel's fastest path.
    """
    if tuple(x.shape[-2:]) == (height, width):
        return x
    mode = _TORCH_MODES.get(int(resample))
    if mode is None:
        raise ValueError(f"resample={resample!r} is not supported by the torch backend (use 0, 2 or 3).")
    aa = mode != "nearest"
    kwargs = dict(size=(height, width), mode=mode, antialias=aa)
    if mode != "nearest":
        kwargs["align_corners"] = False
    if x.dtype == torch.uint8 and x.device.type == "cpu" and mode == "bicubic":
        return F.interpolate(x, **kwargs).contiguous()
    y = F.interpolate(x.to(torch.float32) if x.dtype != torch.float64 else x, **kwargs)
    if x.dtype == torch.uint8:
        return y.clamp_(0, 255).round_().to(torch.uint8).contiguous()
    return y.to(x.dtype).contiguous()


def torch_rescale_normalize(x: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                            mean: Any, std: Any) -> torch.Tensor:
    """Fused rescale+normalize, `(x - mean/f) / (std/f)` in float32, the reference torch backend's arithmetic."""
    y = x.to(torch.float32)
    y = y.clone() if y is x else y  # in-place ops below must never touch the caller's tensor
    if do_normalize:
        m = torch.tensor(mean, dtype=torch.float32, device=x.device)
        s = torch.tensor(std, dtype=torch.float32, device=x.device)
        if m.numel() != y.shape[-3]:
            raise ValueError(f"image_mean/std have {m.numel()} values but the image has {y.shape[-3]} channels.")
        if do_rescale:
            m, s = m * (1.0 / rescale_factor), s * (1.0 / rescale_factor)
        return y.sub_(m[:, None, None]).div_(s[:, None, None])
    return y.mul_(rescale_factor) if do_rescale else y
