"""KV cache: preallocated per-layer key/value tensors with per-row fill lengths.

Layout per layer: `keys[l]`, `values[l]` of shape (B, Hkv, Smax, D). Row `b` holds `lengths[b]` filled slots
(pads included when a left-padded prompt was written). Rows may hold different numbers of tokens, which the
continuous-batching engine relies on; `rows(a, b)` is a zero-copy view of a row range.

The cache also carries the per-sequence M-RoPE state the decode step needs:
* `rope_deltas (B,1)`: text position offset of each sequence (set by the prefill call);
* `real_lengths`: number of non-pad tokens per row (text position of the next token before the delta).
This is explicit state travelling with the cache object the caller owns, never module state.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        growable: bool = False,
    ):
        if max_length <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}")
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Host-side bookkeeping: plain ints, so no device sync is needed to know where to write.
        self.lengths = [0] * batch_size
        self.real_lengths = [0] * batch_size
        self.rope_deltas: torch.Tensor | None = None
        self.growable = growable

    @classmethod
    def from_config(cls, text_config, batch_size: int, max_length: int, dtype=torch.float32, device="cpu",
                    growable: bool = False, num_kv_heads: int | None = None) -> "KVCache":
        """`num_kv_heads`: kv heads per layer (default all of the config's); a tensor-parallel rank passes its
        share (the model's `new_cache` / `engine.kv_pool.local_kv_heads` know it; the config does not)."""
        heads = text_config.num_key_value_heads if num_kv_heads is None else num_kv_heads
        return cls(text_config.num_hidden_layers, batch_size, heads, text_config.head_dim,
                   max_length, dtype, device, growable)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest filled row (the past length P in the HF sense when all rows are equal)."""
        return max(self.lengths) if self.lengths else 0

    def is_uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def rows(self, start: int, end: int) -> "KVCache":
        """A view over rows [start, end): shares storage; its lengths are written back by `commit`."""
        view = object.__new__(KVCache)
        view.keys = [k[start:end] for k in self.keys]
        view.values = [v[start:end] for v in self.values]
        view.lengths = self.lengths[start:end]
        view.real_lengths = self.real_lengths[start:end]
        view.rope_deltas = None if self.rope_deltas is None else self.rope_deltas[start:end]
        view.growable = False
        view._parent = (self, start)
        return view

    def sync_to_parent(self) -> None:
        """Copy a row view's bookkeeping back into the cache it was taken from."""
        parent, start = getattr(self, "_parent", (None, 0))
        if parent is None:
            return
        n = len(self.lengths)
        parent.lengths[start:start + n] = self.lengths
        parent.real_lengths[start:start + n] = self.real_lengths
        if self.rope_deltas is not None:
            if parent.rope_deltas is None:
                parent.rope_deltas = torch.zeros(parent.batch_size, 1, dtype=torch.long,
                                                 device=self.rope_deltas.device)
            parent.rope_deltas[start:start + n] = self.rope_deltas

    # ----------------------------------------------------------------------------------------------- writes
    def reserve(self, total: int) -> None:
        """Make room for `total` positions per row (reallocating; for continuing a returned cache)."""
        growable, self.growable = self.growable, True
        try:
            self.ensure_capacity(total)
        finally:
            self.growable = growable

    def ensure_capacity(self, needed: int) -> None:
        """Room for `needed` positions per row: grows a growable cache, else ValueError when it lacks them."""
        if needed <= self.max_length:
            return
        if not self.growable:
            raise ValueError(
                f"KV cache is full: {needed} positions needed but it was allocated for {self.max_length}. "
                "Allocate a larger cache (max_length) or lower max_new_tokens."
            )
        new_len = max(needed, 2 * self.max_length)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], new_len, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                store[i] = grown

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new `key`/`value` (B, Hkv, S, D) after each row's filled part; return (B, Hkv, K, D) keys/values
        where K = max(lengths) + S. Lengths are advanced by `advance` once all layers ran."""
        s = key.shape[2]
        if layer_idx == 0:
            self.ensure_capacity(max(self.lengths) + s)
        kc, vc = self.keys[layer_idx], self.values[layer_idx]
        if self.is_uniform():
            p = self.lengths[0]
            kc[:, :, p:p + s] = key
            vc[:, :, p:p + s] = value
        else:
            b = len(self.lengths)
            rows = torch.arange(b, device=key.device)[:, None]
            pos = torch.tensor(self.lengths, device=key.device)[:, None] + torch.arange(s, device=key.device)
            # Advanced indices on dims 0 and 2 put (B, S) first: (B, S, Hkv, D).
            kc[rows, :, pos] = key.transpose(1, 2)
            vc[rows, :, pos] = value.transpose(1, 2)
        kv_len = max(self.lengths) + s
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def advance(self, num_new: int, new_real: list[int] | None = None) -> None:
        """Mark `num_new` slots filled in every row (`new_real[b]` of them real, non-pad tokens)."""
        for b in range(len(self.lengths)):
            self.lengths[b] += num_new
            self.real_lengths[b] += num_new if new_real is None else new_real[b]
        self.sync_to_parent()

    def reset_rows(self, rows: list[int]) -> None:
        for b in rows:
            self.lengths[b] = 0
            self.real_lengths[b] = 0
            if self.rope_deltas is not None:
                self.rope_deltas[b] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into slot `dst` (the engine compacts active rows to the front)."""
        n = self.lengths[src]
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst], self.real_lengths[dst] = n, self.real_lengths[src]
        if self.rope_deltas is not None:
            self.rope_deltas[dst] = self.rope_deltas[src]

    def select_batch(self, index: torch.Tensor | list[int]) -> None:
        """Keep only the given rows (in that order); used to drop finished sequences in `generate`."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.keys[0].device)
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        ids = idx.tolist()
        self.lengths = [self.lengths[i] for i in ids]
        self.real_lengths = [self.real_lengths[i] for i in ids]
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas.index_select(0, idx.to(self.rope_deltas.device))

    def __len__(self) -> int:
        return len(self.keys)
