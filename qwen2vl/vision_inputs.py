"""The one check of vision inputs: pixel values against their grid, and placeholder tokens against the grid.

A picture (image, or video clip) is described by its row of `grid_thw (n, 3)`: t x h x w patches, whose pixel
values are rows of `pixel_values (sum t*h*w, C*T*p*p)` in grid order; the vision tower merges
`spatial_merge_size`² patches into one feature, one placeholder token each. Every entry point that takes pixels
(the processor's output, `generate`, the engine's prompts, the model's forward, the vision tower) checks them here,
so a mismatch is a ValueError naming the problem before any compute, never an error deep in torch.
"""
from __future__ import annotations

import torch

NAMES = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw"),
         None: ("pixel values", "grid_thw")}


def check_media(kind: str | None, pixels, grid_thw, merge: int, row_width: int | None = None) -> list[list[int]]:
    """Check one kind's pixel values (N, C*T*p*p) against its grid (n, 3); returns the grid as [[t, h, w], ...]
    ([] when neither is given). `kind`: "image" | "video" (names the arguments in the message; None: generic);
    `row_width`: the values per patch row the tower takes (C*T*p*p), unchecked when None."""
    pixel_name, grid_name = NAMES[kind]
    if pixels is None and grid_thw is None:
        return []
    if pixels is None or grid_thw is None:
        given, missing = (pixel_name, grid_name) if grid_thw is None else (grid_name, pixel_name)
        raise ValueError(f"{given} was given without {missing}; pass both (the processor returns both).")
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        shape = tuple(grid_thw.shape) if isinstance(grid_thw, torch.Tensor) else type(grid_thw).__name__
        raise ValueError(f"{grid_name} must be a (num_items, 3) tensor of (t, h, w), got {shape}")
    items = grid_thw.tolist()
    for t, h, w in items:
        if t <= 0 or h <= 0 or w <= 0 or h % merge or w % merge:
            raise ValueError(f"{grid_name} entry {[t, h, w]} is invalid: t, h, w must be > 0 and h, w multiples of "
                             f"spatial_merge_size={merge}")
    n_patches = sum(t * h * w for t, h, w in items)
    width = row_width if row_width is not None else (pixels.shape[-1] if isinstance(pixels, torch.Tensor) else 0)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 2 or tuple(pixels.shape) != (n_patches, width):
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"{pixel_name} must be ({n_patches}, {width if row_width is not None else 'C*T*p*p'}) for "
                         f"{grid_name}={items} (sum of t*h*w patches, C*T*p*p values), got {shape}")
    return items


def placeholder_count(grid_thw, merge: int) -> int:
    """Placeholder tokens (= merged features) the pictures of `grid_thw` take: sum of t*h*w / merge²."""
    return 0 if grid_thw is None else int(grid_thw.prod(-1).sum()) // merge ** 2


def check_placeholders(kind: str, n_tokens: int, grid_thw, merge: int) -> None:
    """The prompt's placeholder tokens of `kind` must be as many as the features its grid gives."""
    n_feat = placeholder_count(grid_thw, merge)
    if n_tokens != n_feat:
        raise ValueError(f"The prompt has {n_tokens} {kind} placeholder tokens but the {kind} inputs give {n_feat} "
                         f"features (t*h*w/merge² per {kind}); build prompts with the processor so each "
                         "placeholder expands to its grid's token count.")
