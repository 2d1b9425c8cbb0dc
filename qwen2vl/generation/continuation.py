"""Continuing a conversation from a returned KV cache: `generate(..., past_key_values=out.past_key_values)`.

As in transformers, `input_ids` is the whole conversation so far (the previous `sequences` plus the new turn) and
the cache holds the KV of its first P tokens; only tokens [P, S) are prefilled. Unlike transformers, pictures and
videos in the new turn work: pass `pixel_values` / `image_grid_thw` for every picture of the conversation (as the
processor returns them for the whole conversation); only the ones whose placeholders lie in the new part are run
through the vision tower, and M-RoPE positions come from the whole conversation, so the result equals prefilling
it from scratch. One conversation at a time (batch size 1, no padding, num_return_sequences 1).
"""
from __future__ import annotations

import torch

from ..model.cache import KVCache
from ..model.placeholders import PlaceholderRange, patch_slices


def check_continuation(cache, input_ids: torch.Tensor, mask: torch.Tensor, n: int, compile_mode) -> int:
    """Validate a continuation before any compute; returns P, the number of cached tokens."""
    if not isinstance(cache, KVCache):
        raise ValueError(f"past_key_values must be the KVCache a previous generate() returned "
                         f"(return_dict_in_generate=True), got {type(cache).__name__}")
    if input_ids.shape[0] != 1 or cache.batch_size != 1 or n != 1:
        raise ValueError("Continuing from past_key_values supports one conversation at a time (batch size 1, "
                         "num_return_sequences=1).")
    if compile_mode:
        raise ValueError("compile=True cannot continue from past_key_values.")
    if not bool(mask.all()):
        raise ValueError("Continuing from past_key_values needs an unpadded prompt (attention_mask all ones).")
    past = cache.get_seq_length()
    if past >= input_ids.shape[1]:
        raise ValueError(f"input_ids ({input_ids.shape[1]} tokens) must extend the {past} tokens held in "
                         "past_key_values: pass the previous sequences followed by the new turn.")
    return past


def prefill_continuation(model, ids: torch.Tensor, cache: KVCache, past: int, media: dict) -> torch.Tensor:
    """Prefill ids[:, past:] after the cached prefix; returns the last position's logits (1, V) float32."""
    cfg = model.config
    grids = {k: (None if media.get(f"{k}_grid_thw") is None else media[f"{k}_grid_thw"].to(ids.device))
             for k in ("image", "video")}
    pos, delta = model.get_rope_index(ids, grids["image"], grids["video"])
    kw = {}
    for kind, tok, pixels, encode in (
            ("image", cfg.image_token_id, media.get("pixel_values"), model.get_image_features),
            ("video", cfg.video_token_id, media.get("pixel_values_videos"), model.get_video_features)):
        grid = grids[kind]
        span = None if grid is None else PlaceholderRange.of(ids[0], tok, grid, cfg.vision_config.spatial_merge_size,
                                                             past)
        if span is None:  # no placeholders of this kind in the new part
            continue
        px = torch.cat([pixels[s] for s in patch_slices(grid, span.items)]).to(ids.device)
        kw[f"{kind}_embeds"] = span.take(encode(px, grid[span.items]))
    cache.reserve(ids.shape[1])
    out = model(input_ids=ids[:, past:], position_ids=pos[:, :, past:], rope_deltas=delta, past_key_values=cache,
                use_cache=True, logits_to_keep=1, **kw)
    return out.logits[:, -1].float()
