"""Which pictures / videos have placeholder tokens in a token range, and their features for that range.

A prefill that starts or ends inside a prompt (a cached prefix, a chunk, a conversation's new turn) needs the
merged vision features of exactly the placeholders in [start, end): `PlaceholderRange` finds their ordinals and
the items (pictures, videos) they belong to, and slices the items' features to them. Shared by the engine's
`ModelWorker` (features through the vision cache), its vision jobs and `generate(past_key_values=...)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PlaceholderRange:
    first: int          # ordinal (among this kind's placeholders) of the first one in the range
    last: int           # one past the last
    bounds: list[int]   # cumulative placeholder counts per item: item i holds ordinals [bounds[i], bounds[i+1])

    @classmethod
    def of(cls, ids: torch.Tensor, token_id: int, grid_thw: torch.Tensor, merge: int, start: int,
           end: int | None = None) -> PlaceholderRange | None:
        """ids (S,) a whole prompt, grid_thw (n, 3) of its items of this kind; None if [start, end) holds none."""
        is_tok = ids == token_id
        first = int(is_tok[:start].sum())
        last = first + int(is_tok[start:end].sum())
        if last == first:
            return None
        bounds = [0]
        for size in (grid_thw.prod(-1) // merge**2).tolist():
            bounds.append(bounds[-1] + size)
        return cls(first, last, bounds)

    @property
    def items(self) -> list[int]:
        """Indices of the items with placeholders in the range."""
        return [i for i in range(len(self.bounds) - 1) if self.bounds[i + 1] > self.first and self.bounds[i] < self.last]

    def take(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The range's features (last - first, H) from `feats`, the features of `items` in order."""
        lo = self.bounds[self.items[0]]
        return torch.cat(list(feats))[self.first - lo:self.last - lo]


def patch_slices(grid_thw: torch.Tensor, items: list[int]) -> list[slice]:
    """Rows of each item in the concatenated pixel values (N, C*T*p*p)."""
    sizes = grid_thw.prod(-1).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(starts[i], starts[i] + sizes[i]) for i in items]
