"""KV prefix cache: the engine's index of stashed KV rows, keyed by tokens *and* media content.

A finished (or just prefilled) sequence's KV row is copied into a stash entry held by the model worker(s)
(`ModelWorker.stash`); a later request whose prompt starts with the same keys gets that KV copied into its own row
(`restore`) and prefills only the rest. The index lives on the engine (rank 0); under tensor parallelism every
rank's worker holds the same entries (each its share of the kv heads), because every stash/restore/drop is
mirrored on all ranks.

Keys: one per token — the token id, except for image/video placeholder tokens, whose key is
(content hash of that picture/video, index of the token inside it). Two different pictures with the same
placeholder count therefore never share KV, nor does the same file at another `max_pixels` (other pixels, other
grid), while the same picture sent again (any URL) does. Keys are grouped in blocks of `BLOCK` tokens whose chained
hashes index the entries (vLLM's scheme); a candidate found through the blocks is verified key by key and then
extended token by token past the last whole block. A match may end anywhere, also inside a picture's block:
positions come from the whole prompt, so the KV of the first k placeholder tokens is the same whatever follows.

Entries are evicted least-recently-used when the byte budget is exceeded; an entry is copied out synchronously on
the step thread, so it is never evicted while in use. An entry that a newer one extends (the prompt-only stash of a
request, replaced by prompt + answer when it finishes; turn 1 of a chat, extended by turn 2) is dropped.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

BLOCK = 16


def token_keys(token_ids: list[int], placeholder_hashes: dict[int, tuple[str, ...]], merge: int,
               grids: dict[int, list]) -> list:
    """Per-token keys: placeholder tokens (of the ids in `placeholder_hashes`) become (hash, k)."""
    keys: list = list(token_ids)
    for tok, hashes in placeholder_hashes.items():
        if not hashes:
            continue
        sizes = [int(t * h * w) // merge**2 for t, h, w in grids[tok]]
        item, k = 0, 0
        for i, t in enumerate(token_ids):
            if t != tok:
                continue
            if item >= len(hashes):
                break  # more placeholders than media: the engine's input check rejects this prompt
            keys[i] = (hashes[item], k)
            k += 1
            if k == sizes[item]:
                item, k = item + 1, 0
    return keys


def block_hashes(keys: list) -> list[int]:
    out, h = [], 0
    for i in range(0, len(keys) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(keys[i:i + BLOCK])))
        out.append(h)
    return out


@dataclass
class Entry:
    id: int
    keys: list
    blocks: list[int]
    bytes: int


class PrefixCache:
    """The index. `lookup(keys) -> (entry_id | None, matched)`; `insert(keys) -> (entry_id | None, dropped ids)`."""

    def __init__(self, max_bytes: int, bytes_per_token: int):
        self.max_bytes = int(max_bytes)
        self.bytes_per_token = int(bytes_per_token)
        self.bytes = 0
        self.entries: OrderedDict[int, Entry] = OrderedDict()   # LRU order: oldest first
        self.by_block: dict[int, set[int]] = {}
        self._ids = itertools.count()
        self.queries = 0
        self.hits = 0
        self.cached_tokens = 0

    def lookup(self, keys: list, limit: int | None = None, count: bool = True) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with `keys` and that prefix's length (at most `limit`).
        `count=False`: an internal look (insert, admission planning), not a client's query in the stats."""
        self.queries += count
        best, matched = None, 0
        for i, h in enumerate(block_hashes(keys)):
            ids = self.by_block.get(h)
            if not ids:
                break
            best = next(iter(ids))
            matched = (i + 1) * BLOCK
        if best is None:
            return None, 0
        entry = self.entries[best]
        if entry.keys[:matched] != keys[:matched]:  # a hash collision: never reuse unverified KV
            return None, 0
        end = min(len(entry.keys), len(keys))
        while matched < end and entry.keys[matched] == keys[matched]:
            matched += 1
        if limit is not None:
            matched = min(matched, limit)
        if matched == 0:
            return None, 0
        self.entries.move_to_end(best)
        if count:
            self.hits += 1
            self.cached_tokens += matched
        return best, matched

    def insert(self, keys: list) -> tuple[int | None, list[int]]:
        """Index a new entry for `keys` (the caller stashes the KV under the returned id) and return the ids of
        the entries dropped to make room or because the new one contains them (the caller drops their KV)."""
        size = len(keys) * self.bytes_per_token
        if size == 0 or size > self.max_bytes or len(keys) < BLOCK:
            return None, []
        dropped = []
        contained, n = self.lookup(keys, count=False)
        if contained is not None and n == len(self.entries[contained].keys):
            dropped.append(self._remove(contained))
        entry = Entry(next(self._ids), list(keys), block_hashes(keys), size)
        while self.entries and self.bytes + size > self.max_bytes:
            dropped.append(self._remove(next(iter(self.entries))))
        self.entries[entry.id] = entry
        self.bytes += size
        for h in entry.blocks:
            self.by_block.setdefault(h, set()).add(entry.id)
        return entry.id, dropped

    def _remove(self, entry_id: int) -> int:
        entry = self.entries.pop(entry_id)
        self.bytes -= entry.bytes
        for h in entry.blocks:
            ids = self.by_block.get(h)
            if ids is not None:
                ids.discard(entry_id)
                if not ids:
                    del self.by_block[h]
        return entry_id

    def stats(self) -> dict:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_cached_tokens": self.cached_tokens, "prefix_cache_bytes": self.bytes,
                "prefix_cache_entries": len(self.entries)}


class PrefixReuse:
    """The prefix cache as the engine uses it: the index above (None when prefix caching is off) and the KV copies
    the model worker(s) hold, reached through the engine's `ModelRunner` (`stash` / `restore` / `drop`)."""

    def __init__(self, index: PrefixCache | None, runner, model_config):
        self.index, self.runner, self.config = index, runner, model_config

    def keys(self, pp, lora: str | None = None) -> list:
        """Per-token keys of a `ProcessedPrompt` (none when prefix caching is off)."""
        if self.index is None:
            return []
        cfg, mm = self.config, pp.mm
        keys = token_keys(pp.token_ids, {cfg.image_token_id: mm.image_hashes, cfg.video_token_id: mm.video_hashes},
                          cfg.vision_config.spatial_merge_size,
                          {cfg.image_token_id: _grid(mm.image_grid_thw), cfg.video_token_id: _grid(mm.video_grid_thw)})
        if lora is not None:  # another adapter's KV differs: tagging the first key keeps every block of
            keys[0] = ("lora", lora, keys[0])  # this prompt apart (block hashes are chained)
        return keys

    def cached_len(self, req) -> int:
        """How many prompt tokens the prefix cache would give (a look without counting it as a hit)."""
        if self.index is None or not req.keys:
            return 0
        return self.index.lookup(req.keys, limit=len(req.keys) - 1, count=False)[1]

    def restore(self, req, row: int) -> None:
        """Copy the longest cached prefix of the prompt into `row` (at least one token is left to prefill)."""
        req.prefilled = 0
        if self.index is None or not req.keys:
            return
        entry, n = self.index.lookup(req.keys, limit=len(req.keys) - 1)
        if entry is not None:
            self.runner.restore(entry, row, n)
            req.prefilled = req.num_cached_tokens = n

    def stash(self, keys: list, row: int, n: int) -> None:
        """Keep the first n tokens' KV of `row` under `keys[:n]`."""
        if self.index is None or n == 0:
            return
        entry, dropped = self.index.insert(keys[:n])
        self.runner.drop(dropped)
        if entry is not None:
            self.runner.stash(entry, row, n)

    def stash_finished(self, seqs, row_lengths: list[int]) -> None:
        """Keep the KV of finished answers (prompt + output): the next turn of a chat starts with them.
        `row_lengths`: the cache's tokens per row."""
        if self.index is None:
            return
        for s in seqs:
            req = s.request
            if s.index != 0 or s.row is None or not req.keys or s.finish_reason in (None, "abort"):
                continue
            n = row_lengths[s.row]
            self.stash(req.keys + s.output_ids[:n - len(req.keys)], s.row, n)

    def stats(self) -> dict:
        return {} if self.index is None else self.index.stats()


def _grid(grid_thw) -> list:
    return [] if grid_thw is None else grid_thw.tolist()
