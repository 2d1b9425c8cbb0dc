"""Tensor-parallel layers (Megatron-style) on `torch.distributed`.

Every rank of the tensor-parallel group holds one shard and runs the same forward; collectives keep the
activations that leave a block replicated:

* `ColumnParallelLinear`: output features split (rank r holds rows [r*O/N, (r+1)*O/N) of W and of the bias);
  the output stays sharded (no communication) and feeds a row-parallel layer or local attention heads.
* `RowParallelLinear`: input features split; partial products are summed with one all-reduce; a bias (none in
  Qwen2) is added once after the reduction.
* `VocabParallelEmbedding`: vocab rows split (padded to a multiple of N); ids outside a rank's range give zeros
  and an all-reduce sums the single non-zero contribution (exact).
* `VocabParallelLMHead`: vocab rows split; local logits are all-gathered and concatenated so that every rank
  holds the full, bitwise identical (B,S,V) logits (padding columns dropped).

Collectives are in-place (`dist.all_reduce`) when no gradient is needed and go through the autograd-aware
`torch.distributed.nn.functional` versions otherwise.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def shard_size(n: int, tp_size: int, pad: bool = False) -> int:
    """Per-rank share of `n` (rounded up when `pad`, i.e. the last ranks hold zero padding)."""
    return -(-n // tp_size) if pad else n // tp_size


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    if _needs_grad(x):
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x, group=group)
    dist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dim, in rank order."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    if _needs_grad(x):
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(x, group=group)
    else:
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _TPMixin:
    tp_rank: int
    tp_size: int
    tp_group: object

    def _set_tp(self, tp_rank: int, tp_size: int, group) -> None:
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, group

    @classmethod
    def _shard(cls, full: int, tp_size: int, what: str) -> int:
        """This rank's share of ``full`` features; they must split evenly."""
        if full % tp_size:
            raise ValueError(f"{cls.__name__}: {full} {what} features do not split over {tp_size} ranks")
        return full // tp_size


class ColumnParallelLinear(nn.Linear, _TPMixin):
    """`full_out_features` split over ranks; this rank computes its slice (no communication)."""

    def __init__(self, in_features: int, full_out_features: int, bias: bool, tp_rank: int, tp_size: int,
                 group=None, device=None, dtype=None):
        super().__init__(in_features, self._shard(full_out_features, tp_size, "output"), bias=bias, device=device,
                         dtype=dtype)
        self._set_tp(tp_rank, tp_size, group)
        self.full_out_features = full_out_features

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tp={self.tp_rank}/{self.tp_size} (column)"


class RowParallelLinear(nn.Linear, _TPMixin):
    """`full_in_features` split over ranks; output all-reduced (full, replicated on every rank)."""

    def __init__(self, full_in_features: int, out_features: int, bias: bool, tp_rank: int, tp_size: int,
                 group=None, device=None, dtype=None):
        super().__init__(self._shard(full_in_features, tp_size, "input"), out_features, bias=bias, device=device,
                         dtype=dtype)
        self._set_tp(tp_rank, tp_size, group)
        self.full_in_features = full_in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce_sum(F.linear(x, self.weight), self.tp_group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tp={self.tp_rank}/{self.tp_size} (row, all-reduce)"


class VocabParallelEmbedding(nn.Embedding, _TPMixin):
    """Rows [rank*Vs, (rank+1)*Vs) of the (padded) vocab, Vs = ceil(V/N); output all-reduced."""

    def __init__(self, vocab_size: int, embedding_dim: int, tp_rank: int, tp_size: int, group=None,
                 device=None, dtype=None):
        shard = shard_size(vocab_size, tp_size, pad=True)
        super().__init__(shard, embedding_dim, device=device, dtype=dtype)
        self._set_tp(tp_rank, tp_size, group)
        self.vocab_size = vocab_size
        self.vocab_start = tp_rank * shard

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce_sum(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab={self.vocab_size}, "
                f"start={self.vocab_start}, tp={self.tp_rank}/{self.tp_size} (vocab)")


class VocabParallelLMHead(nn.Linear, _TPMixin):
    """LM head over the same vocab rows as `VocabParallelEmbedding` (so a tied head shares its weight);
    returns full logits (..., V) on every rank."""

    def __init__(self, hidden_size: int, vocab_size: int, tp_rank: int, tp_size: int, group=None,
                 device=None, dtype=None):
        shard = shard_size(vocab_size, tp_size, pad=True)
        super().__init__(hidden_size, shard, bias=False, device=device, dtype=dtype)
        self._set_tp(tp_rank, tp_size, group)
        self.vocab_size = vocab_size
        self.vocab_start = tp_rank * shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(F.linear(x, self.weight), self.tp_group)
        return logits[..., : self.vocab_size] if logits.shape[-1] != self.vocab_size else logits

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vocab={self.vocab_size}, tp={self.tp_rank}/{self.tp_size} (gathered)"
