"""Input checks and the one-time vision encoding of `generate`.

Everything here that can reject a request runs before any model compute (`check_prompt`, `plan_vision`).
Shapes: input_ids / attention_mask (B,S); pixel_values (N, C*T*p*p) with grids (n,3) = (t,h,w) in patches;
merged vision features (n_tokens, H) with n_tokens = sum(t*h*w) / merge².
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..vision_inputs import check_media


def check_prompt(input_ids, attention_mask, pad_token_id: int | None, eos_ids: list[int]) -> torch.Tensor:
    """Validate the prompt; return the (B,S) long attention mask (inferred from pads when not given, as
    transformers does when the pad id is not an EOS id)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is None:
        if pad_token_id is not None and pad_token_id not in eos_ids and bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
        else:
            attention_mask = torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
    if not bool((mask.sum(-1) > 0).all()):
        raise ValueError("Every prompt needs at least one real token (a row of attention_mask is all 0).")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError("Generation needs left padding: a row of attention_mask has padding after real tokens. "
                         "Pad batched prompts on the left (tokenizer/processor padding_side='left').")
    return mask


@dataclass
class VisionPlan:
    """Which grid items (indices into image_grid_thw / video_grid_thw) belong to each sample, in order."""
    images: list[list[int]]
    videos: list[list[int]]


def _assign(kind: str, token_name: str, counts: list[int], items: list[list[int]], merge: int) -> list[list[int]]:
    """Split the grid items over samples by placeholder counts; ValueError when they do not add up."""
    sizes = [t * h * w // merge ** 2 for t, h, w in items]
    if sum(counts) != sum(sizes):
        raise ValueError(f"The prompts contain {sum(counts)} {token_name} tokens but the {kind}_grid_thw entries "
                         f"describe {len(sizes)} {kind}(s) with {sum(sizes)} tokens (t*h*w/merge² each: {sizes}). "
                         "Build prompts with the processor so each placeholder expands to its grid's token count.")
    out, i = [], 0
    for b, n in enumerate(counts):
        mine, got = [], 0
        while got < n and i < len(sizes):
            mine.append(i)
            got += sizes[i]
            i += 1
        if got != n:
            raise ValueError(f"Sample {b} has {n} {token_name} tokens, which is not the token count of whole "
                             f"{kind}s in {kind}_grid_thw order (sizes {sizes}).")
        out.append(mine)
    return out


def plan_vision(model_config, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                video_grid_thw) -> VisionPlan:
    """Check pixels/grids against each other and against the placeholder tokens of every sample."""
    vc = model_config.vision_config
    merge = vc.spatial_merge_size
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    img = check_media("image", pixel_values, image_grid_thw, merge, width)
    vid = check_media("video", pixel_values_videos, video_grid_thw, merge, width)
    real = attention_mask.to(input_ids.device).bool()
    n_img = ((input_ids == model_config.image_token_id) & real).sum(-1).tolist()
    n_vid = ((input_ids == model_config.video_token_id) & real).sum(-1).tolist()
    return VisionPlan(_assign("image", "<|image_pad|>", n_img, img, merge),
                      _assign("video", "<|video_pad|>", n_vid, vid, merge))


def encode_vision(model, plan: VisionPlan, repeats: int, pixel_values, image_grid_thw, pixel_values_videos,
                  video_grid_thw) -> dict:
    """Run the vision tower once; return the prefill kwargs (image_embeds/video_embeds (n_tokens,H) and the
    grids) for the batch expanded `repeats` times per sample (row order b*repeats + j)."""
    out = {}
    for kind, pixels, grid, per_sample, encode in (
            ("image", pixel_values, image_grid_thw, plan.images, model.get_image_features),
            ("video", pixel_values_videos, video_grid_thw, plan.videos, model.get_video_features)):
        if grid is None or grid.shape[0] == 0:
            continue
        device = model.device
        feats = encode(pixels.to(device), grid.to(device))           # tuple of (n_i, H), one per item
        order = [i for items in per_sample for _ in range(repeats) for i in items]
        out[f"{kind}_embeds"] = torch.cat([feats[i] for i in order], 0)
        out[f"{kind}_grid_thw"] = grid[torch.tensor(order, dtype=torch.long)].to(device)
    return out
