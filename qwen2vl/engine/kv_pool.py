"""The engine's KV rows: sizing the pool, and the bookkeeping of which row each running sequence holds.

The KV memory itself is one `KVCache` owned by the engine's model worker (`runner.ModelWorker`, whose forwards
write it; under tensor parallelism every rank's worker holds one, each with its share of the kv heads). `KVPool`
only decides rows: rows [0, num_active) are in use and kept compacted, so a decode step runs on the zero-copy view
`cache.rows(0, n)`; it asks the worker to clear / copy rows (`reset_rows(rows)`, `move_rows([(src, dst), ...])`).
Each row holds up to `max_model_len` tokens (prompt + output). The number of rows comes from `max_num_seqs`,
capped by `kv_cache_memory` bytes when given (under tensor parallelism: bytes per rank, `pool_rows`).
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


def local_kv_heads(model) -> int:
    """The kv heads one rank's cache holds: all of them, or num_key_value_heads / N for a model sharded over N
    tensor-parallel ranks (`parallel.tp.parallelize` sets `model.tp_world_size`)."""
    return model.config.text_config.num_key_value_heads // getattr(model, "tp_world_size", 1)


def kv_bytes_per_token(text_config, kv_heads: int, dtype: torch.dtype) -> int:
    """K + V bytes per token of a cache holding `kv_heads` heads per layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * kv_heads * text_config.head_dim * elem


def pool_rows(max_num_seqs: int, max_model_len: int, bytes_per_token: int, kv_cache_memory=None) -> int:
    """How many rows (sequences) the pool holds: `max_num_seqs`, fewer if `kv_cache_memory` (bytes or '2GiB')
    cannot hold that many rows of `max_model_len` tokens."""
    if max_num_seqs < 1 or max_model_len < 2:
        raise ValueError(f"max_num_seqs must be >= 1 and max_model_len >= 2, got {max_num_seqs}, {max_model_len}")
    budget = parse_memory(kv_cache_memory)
    if budget is None:
        return max_num_seqs
    per_row = bytes_per_token * max_model_len
    if budget < per_row:
        raise ValueError(f"kv_cache_memory={budget} bytes cannot hold one sequence of max_model_len="
                         f"{max_model_len} tokens ({per_row} bytes); raise it or lower max_model_len.")
    return min(max_num_seqs, budget // per_row)


class KVPool:
    def __init__(self, worker, max_num_seqs: int, max_model_len: int, bytes_per_token: int):
        """`worker`: owns the cache of `max_num_seqs` rows (see the module docstring)."""
        self.worker = worker
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.bytes = bytes_per_token * max_model_len * max_num_seqs
        self.num_active = 0
        self.reserved = 0  # rows at the top held by a request whose prefill is still running (chunked prefill)

    @property
    def cache(self) -> KVCache:
        """This process's cache (rank 0's under tensor parallelism): read it, change rows only through the pool."""
        return self.worker.cache

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
        self.worker.reset_rows(list(range(first, first + k)))
        return first

    def unreserve(self, first: int, k: int) -> None:
        self.reserved -= k
        self.worker.reset_rows(list(range(first, first + k)))

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
            self.worker.reset_rows(vacated)
        return start

    def allocate(self, k: int) -> int:
        """Reserve k rows at the end of the active range; returns the first one."""
        if k > self.num_free:
            raise RuntimeError(f"KV pool has {self.num_free} free rows, {k} requested")
        start = self.num_active
        self.num_active += k
        self.worker.reset_rows(list(range(start, start + k)))
        return start

    def copy_rows(self, moves: list[tuple[int, int]]) -> None:
        """Copy row src into dst for each (src, dst); src stays valid."""
        if moves:
            self.worker.move_rows(moves)

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
        self.worker.reset_rows(list(range(new_n, self.num_active)))
        self.num_active = new_n
