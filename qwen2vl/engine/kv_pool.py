"""The engine's KV memory: one `KVCache` with one row per concurrently running sequence.

Rows [0, num_active) are in use and kept compacted, so a decode step runs on the zero-copy view
`cache.rows(0, n)`. Each row holds up to `max_model_len` tokens (prompt + output). The number of rows comes from
`max_num_seqs`, capped by `kv_cache_memory` bytes when given.
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
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * text_config.head_dim * elem


class KVPool:
    def __init__(self, text_config, *, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
                 device: torch.device | str, kv_cache_memory=None):
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
        self.cache = KVCache.from_config(text_config, max_num_seqs, max_model_len, dtype, device)
        self.num_active = 0

    @property
    def num_free(self) -> int:
        return self.max_num_seqs - self.num_active

    def allocate(self, k: int) -> int:
        """Reserve k rows at the end of the active range; returns the first one."""
        if k > self.num_free:
            raise RuntimeError(f"KV pool has {self.num_free} free rows, {k} requested")
        start = self.num_active
        self.num_active += k
        self.cache.reset_rows(list(range(start, start + k)))
        return start

    def copy_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)  # copies; src stays valid

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
        for dst, s in zip(holes, movers):
            self.cache.move_row(s.row, dst)
            s.row = dst
        self.cache.reset_rows(list(range(new_n, self.num_active)))
        self.num_active = new_n
