"""Vision-tower outputs cached by content, and the content hashes that key them (and the KV prefix cache).

A picture's key is a hash of its *preprocessed* pixels, its grid (t, h, w) and the pixel tensor's dtype/width —
never of a file name or URL — so the same picture sent again (another turn, another request, another URL) hits,
while the same file at another `max_pixels` (other pixels, other grid) or another picture with the same number of
placeholder tokens misses. Values are the merged features `(t*h*w / merge², H)` on the model's device; the cache
is an LRU bounded in bytes.

`media_hashes(pixel_values, grid_thw) -> [str]` splits a prompt's concatenated patches per picture/video.
`VisionCache.encode(encode_fn, pixel_values, grid_thw, hashes, skip=...)` returns the per-item features, running
the tower once (batched) for the items it does not hold.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from ..model.placeholders import patch_slices


def media_hashes(pixel_values: torch.Tensor | None, grid_thw: torch.Tensor | None) -> tuple[str, ...]:
    """One content hash per picture / video of a prompt: pixel_values (N, C*T*p*p), grid_thw (n, 3)."""
    if pixel_values is None or grid_thw is None:
        return ()
    flat = pixel_values.detach().cpu().contiguous()
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        n = int(t) * int(h) * int(w)
        h_ = hashlib.blake2b(digest_size=16)
        h_.update(f"{t}x{h}x{w}|{flat.dtype}|{flat.shape[-1]}|".encode())
        h_.update(flat[start:start + n].view(torch.uint8).numpy().data)
        out.append(h_.hexdigest())
        start += n
    return tuple(out)


class VisionCache:
    """LRU of merged vision features keyed by content hash, bounded by `max_bytes` (0 disables it)."""

    def __init__(self, max_bytes: int = 256 * 1024**2):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # one cache may serve the engine's step thread and generate() callers

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            feats = self._items.get(key)
            if feats is not None:
                self._items.move_to_end(key)
            return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = feats
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, gone = self._items.popitem(last=False)
                self.bytes -= gone.numel() * gone.element_size()

    def encode(self, encode_fn, pixel_values: torch.Tensor, grid_thw: torch.Tensor, hashes, skip=(),
               known: dict | None = None) -> list:
        """Features per item, in order (None for the indices in `skip`, which the caller does not need);
        `known`: {hash: features} computed elsewhere (held whatever the cache's budget).

        encode_fn(pixel_values, grid_thw) -> list of per-item features (the model's get_image_features)."""
        out: list[torch.Tensor | None] = [None] * len(hashes)
        todo = []
        for i, key in enumerate(hashes):
            if i in skip:
                continue
            if known and key in known:  # encoded for this request by a vision job (counted when it started)
                out[i] = known[key]
                continue
            hit = self.get(key) if self.max_bytes > 0 else None
            if hit is not None:
                self.hits += 1
                out[i] = hit
            else:
                self.misses += 1
                todo.append(i)
        if todo:
            pixels = torch.cat([pixel_values[s] for s in patch_slices(grid_thw, todo)])
            feats = encode_fn(pixels, grid_thw[todo])
            for i, f in zip(todo, feats):
                out[i] = f
                if self.max_bytes > 0:
                    self.put(hashes[i], f)
        return out

    def stats(self) -> dict:
        return {"vision_cache_hits": self.hits, "vision_cache_misses": self.misses,
                "vision_cache_bytes": self.bytes, "vision_cache_items": len(self._items)}
