"""Model calls of the engine: prefill one request into its own KV row, decode a batch of rows.

* `ModelWorker(model, max_num_seqs, max_model_len, num_kv_heads)` owns the model and the engine's `KVCache`
  (`max_num_seqs` rows of `num_kv_heads` heads: this rank's share under tensor parallelism) and does all torch
  work: `prefill(token_ids, mm, row) -> logits (V,)`: input_ids (1, S) (+ pixel values, CPU tensors in
  `mm`: the vision tower runs once per request) on `cache.rows(row, row + 1)`, the returned rope_deltas stay
  in the cache row; `decode(tokens, n) -> logits (n, V)`: input_ids (n, 1) on the view `cache.rows(0, n)` (no
  attention_mask: each row's own length says which keys are valid, M-RoPE positions come from the row's real
  length + delta); `reset_rows(rows)` / `move_rows([(src, dst)])` for the KV pool's row bookkeeping.
* `TPWorker(tp_runner, ...)`: the same interface under tensor parallelism, on rank 0. It creates a
  `ModelWorker` on every rank (`tp_runner.create`) and sends each call to all of them (`tp_runner.call`), so
  every rank runs the same forwards on identical KV caches (each holding its share of the kv heads); results
  come from rank 0's worker. Arguments are token-id lists, row numbers and CPU vision tensors (cheap to send).
* `ModelRunner(worker)`: the engine's only handle on the worker: it turns requests into the worker's calls, whose
  arguments are plain (token-id lists, row numbers, adapter indices, CPU tensors) so that a `TPWorker` can send
  them to every rank, and it holds what the engine reads of the model (device, vocabulary size).
All calls come from the engine's single step thread (`encode_media`: from a processing thread, local worker only).
"""
from __future__ import annotations

import contextlib

import torch

from ..model.cache import KVCache
from ..model.placeholders import PlaceholderRange
from .kv_pool import local_kv_heads
from .vision_cache import VisionCache, media_hashes
from .vision_jobs import VisionJobs

WORKER_NAME = "qwen2vl-engine-worker"


class ModelWorker:
    """One per rank: the model + the KV cache its forwards write."""

    def __init__(self, model, max_num_seqs: int, max_model_len: int, num_kv_heads: int | None = None,
                 vision_cache_bytes: int = 0):
        """`num_kv_heads`: kv heads per layer in this rank's cache (default `kv_pool.local_kv_heads(model)`)."""
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        kv_heads = local_kv_heads(model) if num_kv_heads is None else num_kv_heads
        self.cache = KVCache.from_config(model.config.text_config, max_num_seqs, max_model_len, model.dtype,
                                         model.device, num_kv_heads=kv_heads)
        self.vision_cache = VisionCache(vision_cache_bytes)
        self.vision_jobs = VisionJobs(model, self.vision_cache)
        self.stashed: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # prefix-cache entries
        self.loras = None  # the engine's LoraAdapters once an adapter is served

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], mm: dict, row: int, start: int = 0, end: int | None = None,
                hashes: dict | None = None, adapter: int = -1) -> torch.Tensor:
        """Run prompt tokens [start, end) on `cache.rows(row, row + 1)` (holding tokens [0, start) already:
        restored from the prefix cache, or earlier chunks) and return the last position's logits (V,).

        Positions come from the whole prompt (so a chunk or a cached prefix may end anywhere, inside a picture's
        placeholders too); vision features come from the vision cache, computed only for the pictures/videos
        with placeholders in [start, end). `hashes`: {"image": (...), "video": (...)} content hashes."""
        end = len(token_ids) if end is None else end
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        mm = {k: v.to(self.device) for k, v in mm.items() if v is not None}
        hashes = hashes or {}
        pos, delta = self.model.get_rope_index(ids, mm.get("image_grid_thw"), mm.get("video_grid_thw"))
        kw = {}
        for kind, tok in (("image", self.model.config.image_token_id), ("video", self.model.config.video_token_id)):
            grid = mm.get(f"{kind}_grid_thw")
            if grid is None:
                continue
            pixels = mm["pixel_values" if kind == "image" else "pixel_values_videos"]
            feats = self._features(kind, ids[0], tok, pixels, grid, hashes.get(kind), start, end)
            if feats is not None:
                kw[f"{kind}_embeds"] = feats
        with self._lora([adapter] if adapter >= 0 else None):
            out = self.model(input_ids=ids[:, start:end], position_ids=pos[:, :, start:end], rope_deltas=delta,
                             past_key_values=self.cache.rows(row, row + 1), use_cache=True, logits_to_keep=1, **kw)
        return out.logits[0, -1]

    def _features(self, kind, ids, tok, pixels, grid, hashes, start, end):
        """Merged features of the placeholder tokens of `kind` in [start, end), (n, H), or None if none."""
        span = PlaceholderRange.of(ids, tok, grid, self.model.config.vision_config.spatial_merge_size, start, end)
        if span is None:
            return None
        skip = set(range(grid.shape[0])) - set(span.items)
        if hashes is None or len(hashes) != grid.shape[0]:
            hashes = media_hashes(pixels, grid)
        encode = self.model.get_image_features if kind == "image" else self.model.get_video_features
        parts = self.vision_cache.encode(lambda p, g: list(encode(p.to(self.dtype), g)), pixels, grid, hashes, skip,
                                         known=self.vision_jobs.ready())
        return span.take([p for p in parts if p is not None])

    # vision work of a prompt prefilled in chunks, a bounded slice per engine step (see vision_jobs)
    @torch.inference_mode()
    def vision_begin(self, job_id: str, token_ids: list[int], mm: dict, hashes: dict, start: int) -> bool:
        return self.vision_jobs.begin(job_id, token_ids, mm, hashes or {}, start)

    @torch.inference_mode()
    def vision_run(self, job_id: str, budget: float, weights: dict | None = None,
                   at_least_one: bool = True) -> tuple[bool, float, dict]:
        return self.vision_jobs.run(job_id, budget, weights, at_least_one)

    def vision_end(self, job_id: str) -> None:
        self.vision_jobs.end(job_id)

    @torch.inference_mode()
    def encode_media(self, mm: dict, hashes: dict) -> None:
        """Run the vision tower for a prompt's pictures/videos into the vision cache (called off the step thread
        so that a large picture does not stall the running streams; the prefill then finds its features)."""
        for kind, pixels_name, encode in (("image", "pixel_values", self.model.get_image_features),
                                          ("video", "pixel_values_videos", self.model.get_video_features)):
            grid = mm.get(f"{kind}_grid_thw")
            if grid is None or self.vision_cache.max_bytes <= 0:
                continue
            pixels = mm[pixels_name].to(self.device)
            self.vision_cache.encode(lambda p, g: list(encode(p.to(self.dtype), g)), pixels, grid.to(self.device),
                                     hashes.get(kind) or media_hashes(pixels, grid))

    @torch.inference_mode()
    def stash(self, entry_id: int, row: int, n: int) -> None:
        """Copy the first n tokens' KV of `row` into prefix-cache entry `entry_id`."""
        self.stashed[entry_id] = ([k[row, :, :n].clone() for k in self.cache.keys],
                                  [v[row, :, :n].clone() for v in self.cache.values])

    @torch.inference_mode()
    def restore(self, entry_id: int, row: int, n: int) -> None:
        """Fill `row` with the first n tokens' KV of entry `entry_id` (the row's prompt starts with its keys)."""
        keys, values = self.stashed[entry_id]
        for dst, src in zip(self.cache.keys, keys):
            dst[row, :, :n] = src[:, :n]
        for dst, src in zip(self.cache.values, values):
            dst[row, :, :n] = src[:, :n]
        self.cache.lengths[row] = self.cache.real_lengths[row] = n

    def drop(self, entry_ids: list[int]) -> None:
        for e in entry_ids:
            self.stashed.pop(e, None)

    @torch.inference_mode()
    def decode(self, tokens: list[int], n: int, adapters: list[int] | None = None) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        with self._lora(adapters):
            out = self.model(input_ids=ids, past_key_values=self.cache.rows(0, n), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _lora(self, rows: list[int] | None):
        """The served LoRA adapter of each batch row for the forward inside (see lora_adapters)."""
        return self.loras.use(rows) if self.loras is not None and rows is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def reset_rows(self, rows: list[int]) -> None:
        self.cache.reset_rows(rows)

    @torch.inference_mode()
    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.cache.move_row(src, dst)


class TPWorker:
    """Rank 0's handle on the `ModelWorker`s of all tensor-parallel ranks (see the module docstring)."""

    def __init__(self, tp_runner, max_num_seqs: int, max_model_len: int, num_kv_heads: int,
                 vision_cache_bytes: int = 0, name: str = WORKER_NAME):
        self.tp_runner, self.name = tp_runner, name
        # rank 0's own worker
        self.local = tp_runner.create(name, ModelWorker, max_num_seqs, max_model_len, num_kv_heads,
                                      vision_cache_bytes)
        self.cache = self.local.cache
        self.vision_cache = self.local.vision_cache

    def _call(self, method: str, *args):
        return self.tp_runner.call(self.name, method, *args)

    def prefill(self, token_ids: list[int], mm: dict, row: int, start: int = 0, end: int | None = None,
                hashes: dict | None = None) -> torch.Tensor:
        return self._call("prefill", list(token_ids), {k: v.cpu() for k, v in mm.items() if v is not None}, row,
                          start, end, hashes)

    def vision_begin(self, job_id: str, token_ids: list[int], mm: dict, hashes: dict, start: int) -> bool:
        return self._call("vision_begin", job_id, list(token_ids), {k: v.cpu() for k, v in mm.items()}, hashes,
                          start)

    def vision_run(self, job_id: str, budget: float, weights: dict | None = None,
                   at_least_one: bool = True) -> tuple[bool, float, dict]:
        return self._call("vision_run", job_id, budget, weights, at_least_one)  # same units on every rank

    def vision_end(self, job_id: str) -> None:
        self._call("vision_end", job_id)

    def stash(self, entry_id: int, row: int, n: int) -> None:
        self._call("stash", entry_id, row, n)

    def restore(self, entry_id: int, row: int, n: int) -> None:
        self._call("restore", entry_id, row, n)

    def drop(self, entry_ids: list[int]) -> None:
        if entry_ids:
            self._call("drop", list(entry_ids))

    def decode(self, tokens: list[int], n: int) -> torch.Tensor:
        return self._call("decode", list(tokens), n)

    def reset_rows(self, rows: list[int]) -> None:
        self._call("reset_rows", list(rows))

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        self._call("move_rows", [tuple(m) for m in moves])


def make_worker(model, max_num_seqs: int, max_model_len: int, num_kv_heads: int, tp_runner=None,
                vision_cache_bytes: int = 0):
    """A local `ModelWorker`, or a `TPWorker` when a tensor-parallel runner (`qwen2vl.parallel.TPRunner`) is given."""
    if tp_runner is None:
        return ModelWorker(model, max_num_seqs, max_model_len, num_kv_heads, vision_cache_bytes)
    return TPWorker(tp_runner, max_num_seqs, max_model_len, num_kv_heads, vision_cache_bytes)


class ModelRunner:
    """The engine's handle on its worker (see the module docstring)."""

    def __init__(self, worker, model, local: bool):
        """`local`: the worker runs in this process only (no tensor parallelism): the vision tower may then run
        off the step thread, and LoRA adapters may be served."""
        self.worker = worker
        self.local = local
        self.device = model.device
        self.vocab = model.config.text_config.vocab_size

    def prefill(self, request, row: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        lora = {"adapter": request.adapter} if request.adapter >= 0 else {}  # (never under TP: add_lora refuses)
        return self.worker.prefill(request.prompt_token_ids, request.mm.tensors(), row, start, end,
                                   request.mm.hashes(), **lora)

    def decode(self, tokens: list[int], n: int, adapters: list[int] | None = None) -> torch.Tensor:
        """adapters: each row's LoRA adapter index (-1: base)."""
        if adapters is not None and any(a >= 0 for a in adapters):
            return self.worker.decode(tokens, n, adapters)
        return self.worker.decode(tokens, n)

    def encode_media(self, pp) -> None:
        """Run the vision tower for a processed prompt's pictures into the vision cache (local worker only: under
        tensor parallelism every rank encodes during the mirrored prefill)."""
        if self.local and pp.mm.tensors():
            self.worker.encode_media(pp.mm.tensors(), pp.mm.hashes())

    def use_loras(self, loras) -> None:
        """Serve `loras` (a `LoraAdapters`) in the local worker's forwards."""
        self.worker.loras = loras

    # vision work of a prompt prefilled in chunks
    def vision_begin(self, request, start: int) -> bool:
        """Plan the vision work of `request`'s prompt from token `start` on; False if there is none to do."""
        if not request.mm.tensors():
            return False
        return self.worker.vision_begin(request.request_id, request.prompt_token_ids, request.mm.tensors(),
                                        request.mm.hashes(), start)

    def vision_run(self, request, budget: float, weights: dict | None = None,
                   at_least_one: bool = True) -> tuple[bool, float, dict]:
        return self.worker.vision_run(request.request_id, budget, weights, at_least_one)

    def vision_end(self, request) -> None:
        self.worker.vision_end(request.request_id)

    # prefix-cache entries (the KV copies the worker holds; the index is the engine's PrefixCache)
    def stash(self, entry_id: int, row: int, n: int) -> None:
        self.worker.stash(entry_id, row, n)

    def restore(self, entry_id: int, row: int, n: int) -> None:
        self.worker.restore(entry_id, row, n)

    def drop(self, entry_ids: list[int]) -> None:
        self.worker.drop(entry_ids)

    def stats(self) -> dict:
        return self.worker.vision_cache.stats()
