"""The demo recipe's optional first stage: the vision tower alone, on the alignment loss.

Why: trained end to end from scratch, the small demo ViT learns colour from the alignment loss but not shape
(a per-token shape probe stays at chance for hundreds of steps while the decoder learns to guess). Trained alone
on the per-token (colour, shape[, centre]) words (``align``), with no decoder in the loop, it reaches ~90 % per-token
shape accuracy in ~700 steps of 32 pictures at ~0.3x the cost of a full step; the full training then starts from
those weights (``train_demo --vision-steps N``).

Only ``model.model.visual`` is optimised: the tower learns to point at the words of the still-random tied
embeddings, and the decoder is not run. (Training the tied LM head here too, as an earlier version did, left
embeddings the decoder then learnt ~10x slower from: answer loss 1.95 vs 0.19 after 150 steps.)
"""
from __future__ import annotations

import math
import time

import torch

from .align import _nll


def vision_parameters(model) -> list[torch.nn.Parameter]:
    return list(model.model.visual.parameters())


def stage_lr(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup, then constant (``min_lr_ratio`` 1) or a cosine decay to ``min_lr_ratio * lr`` at the end."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vision(model, collator, dataset, *, steps: int, batch_size: int, lr: float, warmup: int = 20,
                 bf16: bool = False, log_every: int = 50, min_lr_ratio: float = 1.0,
                 shape_weight: float = 1.0) -> float:
    """``steps`` AdamW steps on the vision alignment loss over ``dataset`` (images; item ``s * batch_size + i``
    for step ``s``, so the stage is reproducible); ``collator`` is an ``AlignCollator``. ``min_lr_ratio`` < 1
    anneals the rate (cosine) so the stage ends at a low rate; ``shape_weight`` > 1 adds that much more of the shape
    words' loss (the hard part: colours and the background are learnt first). Returns the last loss."""
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
        for g in opt.param_groups:
            g["lr"] = stage_lr(s, steps, lr, warmup, min_lr_ratio)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats = model.model.visual(batch["pixel_values"], batch["image_grid_thw"])
            logits, labels = model.lm_head(feats), batch["aux_labels"]
            loss = _nll(logits, labels)
            if shape_weight != 1.0:
                loss = loss + (shape_weight - 1.0) * _nll(logits, labels[:, 1:2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % log_every == 0 or s + 1 == steps:
            print(f"vision stage {s + 1}/{steps}: alignment loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return loss.item()
