"""The engine's KV memory: one `KVCache` with one row per concurrently running sequence.

Rows [0, num_active) are in use and kept compacted, so a decode step runs on the zero-copy view
`cache.rows(0, n)`. Each row holds up to `max_model_len` tokens (prompt + output). The number of rows comes from
`max_num_seqs`, capped by `kv_cache_memory` bytes when given (under tensor parallelism: bytes per rank).

`KVPool` is the row bookkeeping (allocation, compaction); the physical cache lives in a *store* with
`reset_rows(rows)`, `move_rows([(src, dst), ...])` and `.cache`: a local `KVCache` wrapper by default, the
engine's `ModelWorker` (which owns the cache its forwards use), or under tensor parallelism a proxy that
mirrors every row operation on all ranks (`qwen2vl.engine.runner`).
"""
from __future__ import annotations

import re

import torch

from ..model.cache import KVCache

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_memory(value) -> int | None:
    """'2GiB' / '512MB' / '1.5g' / 123456 → bytes (binary units); None stays None."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"Cannot parse memory size {value!r}; use e.g. 2GiB, 512MiB or a byte count.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """K + V bytes per token on this rank (a tensor-parallel rank caches num_key_value_heads / tp_world_size)."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = text_config.num_key_value_heads // getattr(text_config, "tp_world_size", 1)
    return 2 * text_config.num_hidden_layers * kv_heads * text_config.head_dim * elem


class LocalStore:
    """A `KVCache` in this process, as a pool store."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def reset_rows(self, rows: list[int]) -> None:
        self.cache.reset_rows(rows)

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.cache.move_row(src, dst)


class KVPool:
    def __init__(self, text_config, *, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_cache_memory=None, make_store=None):
        """`make_store(max_num_seqs, max_model_len)` builds the store once the row count is known (default: a
        local KVCache on `device`)."""
        if max_num_seqs < 1 or max_model_len < 2:
            raise ValueError(f"max_num_seqs must be >= 1 and max_model_len >= 2, got {max_num_seqs}, {max_model_len}")
        budget = parse_memory(kv_cache_memory)
        per_row = kv_bytes_per_token(text_config, dtype) * max_model_len
        if budget is not None:
            rows = budget // per_row
            if rows < 1:
                raise ValueError(f"kv_cache_memory={budget} bytes cannot hold one sequence of max_model_len="
                                 f"{max_model_len} tokens ({per_row} bytes); raise it or lower max_model_len.")
            max_num_seqs = min(max_num_seqs, int(rows))
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.bytes = per_row * max_num_seqs
        self.store = (make_store(max_num_seqs, max_model_len) if make_store is not None else
                      LocalStore(KVCache.from_config(text_config, max_num_seqs, max_model_len, dtype, device)))
        self.num_active = 0
        self.reserved = 0  # rows at the top held by a request whose prefill is still running (chunked prefill)

    @property
    def cache(self) -> KVCache:
        """This process's cache (rank 0's under tensor parallelism): read it, change it only through the pool."""
        return self.store.cache

    @property
    def num_free(self) -> int:
        return self.max_num_seqs - self.num_active - self.reserved

    def reserve(self, k: int) -> int:
        """Hold k rows at the top of the pool (away from the compacted decode rows [0, num_active)) for a prompt
        prefilled over several steps; returns the first one."""
        if k > self.num_free:
            raise RuntimeError(f"KV pool has {self.num_free} free rows, {k} requested")
        self.reserved += k
        first = self.max_num_seqs - self.reserved
        self.store.reset_rows(list(range(first, first + k)))
        return first

    def unreserve(self, first: int, k: int) -> None:
        self.reserved -= k
        self.store.reset_rows(list(range(first, first + k)))

    def promote(self, first: int, k: int) -> int:
        """The prefilled top row `first` becomes k decode rows at the end of the active range (row copies; the
        reserved block is the only one, so its rows lie at or above the new ones)."""
        self.reserved -= k
        start = self.num_active
        self.num_active += k
        moves = [(first, start)] if first != start else []
        self.copy_rows(moves)
        self.copy_rows([(start, start + i) for i in range(1, k)])
        vacated = [r for r in range(first, first + k) if r >= self.num_active]
        if vacated:
            self.store.reset_rows(vacated)
        return start

    def allocate(self, k: int) -> int:
        """Reserve k rows at the end of the active range; returns the first one."""
        if k > self.num_free:
            raise RuntimeError(f"KV pool has {self.num_free} free rows, {k} requested")
        start = self.num_active
        self.num_active += k
        self.store.reset_rows(list(range(start, start + k)))
        return start

    def copy_row(self, src: int, dst: int) -> None:
        self.copy_rows([(src, dst)])

    def copy_rows(self, moves: list[tuple[int, int]]) -> None:
        """Copy row src into dst for each (src, dst); src stays valid."""
        if moves:
            self.store.move_rows(moves)

    def view(self, start: int, end: int) -> KVCache:
        return self.cache.rows(start, end)

    def release(self, seqs: list, keep: list) -> None:
        """Free the rows of `seqs` and compact: sequences of `keep` (the still-running ones) living past the new
        end move into the holes (at most len(seqs) row copies). Updates `seq.row`."""
        freed = {s.row for s in seqs if s.row is not None}
        for s in seqs:
            s.row = None
        new_n = self.num_active - len(freed)
        holes = sorted(r for r in freed if r < new_n)
        movers = sorted((s for s in keep if s.row >= new_n), key=lambda s: s.row)
        assert len(holes) == len(movers), (holes, [s.row for s in movers])
        moves = []
        for dst, s in zip(holes, movers):
            moves.append((s.row, dst))
            s.row = dst
        self.copy_rows(moves)
        self.store.reset_rows(list(range(new_n, self.num_active)))
        self.num_active = new_n
