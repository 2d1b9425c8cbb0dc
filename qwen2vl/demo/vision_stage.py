"""The demo recipe's optional first stage: the vision tower and the tied LM head alone, on the alignment loss.

Why: trained end to end from scratch, the small demo ViT learns colour from the alignment loss but not shape
(a per-token shape probe stays at chance for hundreds of steps while the decoder learns to guess). Trained alone
on the per-token (colour, shape[, centre]) words (``align``), with no decoder in the loop, it reaches ~90 % per-token
shape accuracy in ~700 steps of 32 pictures at ~0.3x the cost of a full step; the full training then starts from
those weights (``train_demo --vision-steps N``).

Only ``model.model.visual`` and ``model.lm_head.weight`` (tied to the token embeddings) are optimised; the decoder
is not run.
"""
from __future__ import annotations

import time

import torch

from .align import _nll


def vision_parameters(model) -> list[torch.nn.Parameter]:
    return list(model.model.visual.parameters()) + [model.lm_head.weight]


def train_vision(model, collator, dataset, *, steps: int, batch_size: int, lr: float, warmup: int = 20,
                 bf16: bool = False, log_every: int = 50) -> float:
    """``steps`` AdamW steps on the vision alignment loss over ``dataset`` (images; item ``s * batch_size + i``
    for step ``s``, so the stage is reproducible); ``collator`` is an ``AlignCollator``. Returns the last loss."""
    if steps <= 0:
        return float("nan")
    if len(dataset) < steps * batch_size:
        raise ValueError(f"vision stage: {len(dataset)} items for {steps} steps x {batch_size}")
    params = vision_parameters(model)
    opt = torch.optim.AdamW(params, lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    t0, loss = time.perf_counter(), torch.tensor(float("nan"))
    for s in range(steps):
        batch = collator([dataset[s * batch_size + i] for i in range(batch_size)])
        for g in opt.param_groups:  # linear warmup, then constant
            g["lr"] = lr * min(1.0, (s + 1) / max(1, warmup))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats = model.model.visual(batch["pixel_values"], batch["image_grid_thw"])
            loss = _nll(model.lm_head(feats), batch["aux_labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % log_every == 0 or s + 1 == steps:
            print(f"vision stage {s + 1}/{steps}: alignment loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return loss.item()
