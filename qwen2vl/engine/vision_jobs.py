"""The vision work of requests prefilled in chunks, a bounded slice per engine step (one per worker / rank).

With chunked prefill (`max_prefill_tokens_per_step` / `max_prefill_ms_per_step`), a prompt whose pictures / videos
are not in the vision cache gets a job here before its text is prefilled: `begin(job_id, ...)` picks the items with
placeholders in the part still to prefill that the cache does not hold, `run(job_id, budget, weights)` advances
their `VisionEncodeJob`s by at most that much work (flops, or seconds with measured rates: see prefill_budget; at
least one unit), and the finished features go into the vision cache and stay held for the request (`ready`,
whatever the cache's budget) until `end(job_id)`: its prefill chunks take them from there.
"""
from __future__ import annotations

import torch

from ..model.placeholders import PlaceholderRange, patch_slices
from ..model.vision_job import VisionEncodeJob
from .vision_cache import VisionCache, media_hashes

KINDS = (("image", "pixel_values"), ("video", "pixel_values_videos"))


class _Work:
    """One request's jobs: [(kind, hashes of the items, VisionEncodeJob)], and features already done."""

    def __init__(self):
        self.pending: list[tuple[str, list[str], VisionEncodeJob]] = []
        self.ready: dict[str, torch.Tensor] = {}


class VisionJobs:
    def __init__(self, model, cache: VisionCache):
        self.model, self.cache = model, cache
        self.work: dict[str, _Work] = {}

    def begin(self, job_id: str, token_ids: list[int], mm: dict, hashes: dict, start: int) -> bool:
        """Plan the vision work of a prompt whose tokens [start, len) are still to prefill; False if none."""
        cfg, visual = self.model.config, self.model.visual
        ids = torch.tensor(token_ids)
        work = _Work()
        for kind, pixels_name in KINDS:
            grid = mm.get(f"{kind}_grid_thw")
            tok = cfg.image_token_id if kind == "image" else cfg.video_token_id
            span = None if grid is None else PlaceholderRange.of(ids, tok, grid, visual.spatial_merge_size, start)
            if span is None:
                continue
            keys = hashes.get(kind)
            if not keys or len(keys) != grid.shape[0]:
                keys = media_hashes(mm[pixels_name], grid)
            todo = [i for i in span.items if self.cache.max_bytes <= 0 or self.cache.get(keys[i]) is None]
            if not todo:
                continue
            self.cache.misses += len(todo)
            pixels = torch.cat([mm[pixels_name][s] for s in patch_slices(grid, todo)])
            job = VisionEncodeJob(visual, pixels.to(self.model.device, visual.dtype), grid[todo].to(self.model.device))
            work.pending.append((kind, [keys[i] for i in todo], job))
        if work.pending:
            self.work[job_id] = work
        return bool(work.pending)

    def run(self, job_id: str, budget: float, weights: dict | None = None,
            at_least_one: bool = True) -> tuple[bool, float, dict]:
        """Advance a request's jobs by units whose cost (`VisionEncodeJob.run`: flops x weights[kind]) fits in
        `budget` (at least one unit if `at_least_one`); returns (done, cost spent, {kind: (flops, seconds)} of the
        units run)."""
        work = self.work[job_id]
        spent, timings = 0.0, {}
        while work.pending:
            kind, keys, job = work.pending[0]
            spent += job.run(budget - spent, weights, at_least_one=at_least_one and not spent)
            for unit_kind, (flops, seconds) in job.timings.items():
                total = timings.setdefault(unit_kind, [0, 0.0])
                total[0], total[1] = total[0] + flops, total[1] + seconds
            job.timings.clear()
            if not job.done:
                break
            sizes = (job.grid_thw.prod(-1) // self.model.visual.spatial_merge_size ** 2).tolist()
            for key, feats in zip(keys, torch.split(job.result, sizes)):
                work.ready[key] = feats
                if self.cache.max_bytes > 0:
                    self.cache.put(key, feats)
            work.pending.pop(0)
        return not work.pending, spent, {k: tuple(v) for k, v in timings.items()}

    def ready(self) -> dict[str, torch.Tensor]:
        """Finished features of every request in flight, by content hash."""
        return {k: v for w in self.work.values() for k, v in w.ready.items()}

    def end(self, job_id: str) -> None:
        self.work.pop(job_id, None)
