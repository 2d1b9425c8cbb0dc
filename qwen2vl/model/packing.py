"""Packed sequences ("padding-free" batches): several samples laid end to end in one row, each with its own
positions restarting at 0, no padding between them. Attention must stay within each sample.

Samples are found from `position_ids` (a token whose t/h/w positions are all 0, after the row's first real token,
starts a new sample; with text-only or 1-D positions that is "the position restarts at 0", for M-RoPE rows it is
the (0,0,0) corner every sample starts at) or given as `cu_seq_lens` (FlashAttention-style cumulative lengths
over a batch of one row). The result is a (B,S) segment id per token, turned into a block-diagonal causal mask
for sdpa/eager and into per-sample lengths for the FlashAttention-2 varlen kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import VarlenBatch


def segments_from_cu_seq_lens(cu_seq_lens: torch.Tensor, b: int, s: int, device) -> torch.Tensor:
    """cu_seq_lens (n+1,) cumulative sample lengths over the flattened (B*S) tokens → segment ids (B,S)."""
    cu = torch.as_tensor(cu_seq_lens).reshape(-1).to("cpu", torch.long)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != b * s or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seq_lens must rise from 0 to batch*seq = {b * s} tokens, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).view(b, s)
    if b > 1 and bool((seg[1:, 0] == seg[:-1, -1]).any()):
        raise ValueError("cu_seq_lens puts one sample across two batch rows; each row must hold whole samples.")
    return seg.to(device)


def packed_segments(position_ids: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor | None:
    """position_ids (3,B,S), query_valid (B,S) → segment ids (B,S) when some row holds more than one sample
    (a real token at position (0,0,0) after that row's first real token), else None (one sample per row).

    Pads never start a sample, so a left-padded batch (pads at position 0) is not mistaken for a packed one."""
    s = position_ids.shape[-1]
    if s < 2:
        return None
    starts = (position_ids == 0).all(0) & query_valid                       # (B,S)
    idx = torch.arange(s, device=position_ids.device)
    first_real = torch.where(query_valid, idx, s).amin(-1, keepdim=True)    # (B,1)
    restarts = starts & (idx > first_real)
    if not bool(restarts.any()):
        return None
    return restarts.cumsum(-1)


def check_packed_allowed(segments: torch.Tensor | None, cache, past: list[int]) -> None:
    """Packed rows attend within their samples only. Continuing a KV cache's past tokens with a packed chunk, or
    continuing a cache a packed forward filled, would attend across samples: refused instead of answering wrongly.
    A cache filled by a packed forward is marked (`cache.packed`) for that check."""
    if cache is not None and any(past) and (segments is not None or getattr(cache, "packed", False)):
        raise ValueError("Packed sequences (position_ids restarting at 0 within a row, or cu_seq_lens) cannot "
                         "be continued from a KV cache: run each packed batch from an empty cache (or "
                         "use_cache=False), or unpack the samples into separate rows to generate.")
    if cache is not None and segments is not None:
        cache.packed = True


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B,S) segment ids → (B,1,S,S) True where query and key belong to the same sample."""
    return (segments[:, :, None] == segments[:, None, :])[:, None]


def packed_varlen(segments: torch.Tensor, query_valid: torch.Tensor) -> VarlenBatch:
    """The FlashAttention-2 varlen layout of a packed batch without past tokens: every sample (within every
    row) becomes one varlen sequence; queries and keys are the same real tokens."""
    b, s = segments.shape
    seg = segments + torch.arange(b, device=segments.device)[:, None] * (s + 1)   # unique across rows
    flat = seg.reshape(-1)[query_valid.reshape(-1)]
    _, lengths = torch.unique_consecutive(flat, return_counts=True)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    index = None if bool(query_valid.all()) else query_valid.reshape(-1).nonzero().squeeze(1)
    max_len = int(lengths.max())
    return VarlenBatch(index, index, cu, cu, max_len, max_len)
