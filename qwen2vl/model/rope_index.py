"""Position layouts: 3-D M-RoPE positions for the decoder and 2-D patch positions for the vision tower.

M-RoPE rule (the one the checkpoints were trained with, as in Qwen's reference code and vLLM):
* text tokens advance all three axes (t, h, w) together by 1;
* a vision block of grid (t, h, w) patches becomes t x h/m x w/m tokens at positions
  (start + t_idx, start + h_idx, start + w_idx);
* the text after a vision block continues at (max position inside the block) + 1.
For images this equals transformers 5.24; after a video with t > max(h, w)/m transformers 5.x advances by
max(h, w)/m only (a deliberate deviation, pinned by a test).
"""
from __future__ import annotations

import torch


def vision_position_ids(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(num_items, 3) grids → (N, 2) long (h, w) patch coordinates in the processor's merge-block-major row order
    (t, bh, bw, ih, iw); positions restart per item and repeat for every temporal patch."""
    out = []
    m = merge_size
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        # (bh, ih, bw, iw) → (bh, bw, ih, iw)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(out, 0)


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """One attention segment per temporal patch of each item: int32 cumulative lengths (num_segments + 1,)."""
    lens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))


def _block_positions(t: int, h: int, w: int, start: int) -> torch.Tensor:
    """(3, t*h*w) positions of one vision block whose merged grid is (t, h, w)."""
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w).reshape(-1)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w).reshape(-1)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w).reshape(-1)
    return torch.stack([tt, hh, ww]) + start


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D positions for a (possibly left-padded) batch.

    input_ids (B,S); grids (n,3) consumed in order of appearance across the whole batch;
    attention_mask (B,S) 1 = real token. Returns position_ids (3,B,S) long (0 at pads) and
    rope_deltas (B,1) = max position + 1 - number of real tokens, so that the next text token of sequence b sits at
    (#real tokens so far) + rope_deltas[b].
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    bsz, seq = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        mask = torch.ones(bsz, seq, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        mask = attention_mask.bool()
    positions = torch.zeros(3, bsz, seq, dtype=torch.long, device=device)
    deltas = torch.zeros(bsz, 1, dtype=torch.long, device=device)

    has_vision = image_grid_thw is not None or video_grid_thw is not None
    if not has_vision:
        # Text only: one vectorised cumsum; all three axes equal.
        pos = mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(~mask, 0)
        positions[:] = pos
        n_real = mask.sum(-1, keepdim=True)
        deltas = torch.where(n_real > 0, pos.max(-1, keepdim=True).values + 1 - n_real, torch.zeros_like(n_real))
        return positions, deltas

    m = spatial_merge_size
    grids = {
        1: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        2: iter([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    kinds = (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()
    ids_cpu, kinds_cpu, mask_cpu = input_ids.cpu(), kinds.cpu(), mask.cpu()
    for b in range(bsz):
        k = kinds_cpu[b][mask_cpu[b]]
        n = k.numel()
        if n == 0:
            continue
        # Run boundaries of equal token kind.
        change = torch.nonzero(k[1:] != k[:-1]).flatten() + 1
        starts = [0] + change.tolist()
        ends = change.tolist() + [n]
        parts, cur = [], 0
        for s, e in zip(starts, ends):
            kind = int(k[s])
            if kind == 0:
                parts.append(torch.arange(cur, cur + e - s).expand(3, -1))
                cur += e - s
                continue
            remaining = e - s
            # Adjacent placeholders of two items with no separator form one run: split it by the grids.
            while remaining > 0:
                grid = next(grids[kind], None)
                if grid is None:
                    name = "image" if kind == 1 else "video"
                    raise ValueError(f"More {name} placeholder tokens than {name}_grid_thw entries describe.")
                t, h, w = grid
                block = _block_positions(t, h // m, w // m, cur)
                if block.shape[1] > remaining:
                    name = "image" if kind == 1 else "video"
                    raise ValueError(f"A run of {remaining} {name} tokens is shorter than its grid "
                                     f"{grid} needs ({block.shape[1]} tokens).")
                parts.append(block)
                remaining -= block.shape[1]
                cur = int(block.max()) + 1
        pos_b = torch.cat(parts, dim=1).to(device)
        positions[:, b, mask[b]] = pos_b
        deltas[b, 0] = int(pos_b.max()) + 1 - n
    del ids_cpu
    return positions, deltas


def text_positions_from_cache(
    real_lengths: list[int],
    rope_deltas: torch.Tensor | None,
    num_new: int,
    new_mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, list[int]]:
    """Positions (3,B,S) of S new tokens appended to a cache, and the number of real tokens each row adds.

    Text position of a token = (#real tokens before it) + rope_delta of its sequence. `new_mask` (B,S) marks
    which new tokens are real (pads get position 0 like in the prefill layout).
    """
    base = torch.tensor(real_lengths, dtype=torch.long, device=device)[:, None]
    if new_mask is None:
        pos = base + torch.arange(num_new, device=device)
        added = [num_new] * len(real_lengths)
    else:
        m = new_mask.bool()
        pos = (base + m.long().cumsum(-1) - 1).masked_fill(~m, 0)
        added = m.sum(-1).tolist()
    if rope_deltas is not None:
        pos = pos + rope_deltas.to(device)
        if new_mask is not None:
            pos = pos.masked_fill(~new_mask.bool(), 0)
    return pos.unsqueeze(0).expand(3, -1, -1), added
