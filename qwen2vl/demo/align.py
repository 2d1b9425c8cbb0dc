"""The demo recipe's auxiliary alignment loss: each merged image token should name what it shows.

For every merged token of every picture in a batch (the vision tower's order: row-major over the merged grid
given by ``image_grid_thw``), the target is the ids of the colour and shape words of the shape under the token's
centre ("red", "circle"), or "nothing" (and no shape target) on background. The token under each shape's centre
is labelled with that shape even when it is small. The tied LM head applied to the vision tower's output is
trained towards these words, which makes image tokens word-like early and speeds up learning several-fold.
Video tokens get no targets.
"""
from __future__ import annotations

import torch

from .scenes import contains


def token_targets(scene: dict, grid_hw: tuple[int, int]) -> list[tuple[str, str | None]]:
    """(colour, shape) or ("nothing", None) per merged token, for a scene seen as ``grid_hw`` merged tokens."""
    gh, gw = grid_hw
    w, h = scene["size"]
    out: list[tuple[str, str | None]] = []
    for i in range(gh):
        for j in range(gw):
            x, y = (j + 0.5) * w / gw, (i + 0.5) * h / gh
            hit = [s for s in scene["shapes"] if contains(s, x, y)]
            out.append((hit[-1]["color"], hit[-1]["shape"]) if hit else ("nothing", None))
    for s in scene["shapes"]:
        j = min(gw - 1, int(s["center"][0] / w * gw))
        i = min(gh - 1, int(s["center"][1] / h * gh))
        out[i * gw + j] = (s["color"], s["shape"])
    return out


class AlignCollator:
    """SFT batches plus ``aux_labels (n_image_tokens, 2)``: word ids (colour or "nothing", shape or -100)."""

    def __init__(self, sft_collator, merge_size: int = 2):
        self.sft, self.merge = sft_collator, merge_size
        tok = sft_collator.tokenizer

        def word(w):  # byte-level BPE: "Ġred" = " red"; the demo tokenizer keeps these words whole
            i = tok.convert_tokens_to_ids("\u0120" + w)
            if i is None or i == getattr(tok, "unk_token_id", None):
                raise ValueError(f"the demo tokenizer has no single token for ' {w}'")
            return i

        self.word = word

    def __call__(self, records):
        batch = self.sft(records)
        scenes = [r["meta"]["scene"] for r in records if r.get("meta") and r["meta"].get("scene")]
        rows = []
        grids = batch.get("image_grid_thw")
        for scene, (_, gh, gw) in zip(scenes, grids.tolist() if grids is not None else []):
            for color, shape in token_targets(scene, (gh // self.merge, gw // self.merge)):
                rows.append([self.word(color), self.word(shape) if shape else -100])
        batch["aux_labels"] = torch.tensor(rows, dtype=torch.long).view(-1, 2)
        return batch


def aligned_trainer(weight: float):
    from ..training.trainer import Trainer

    class AlignedTrainer(Trainer):
        """Adds ``weight`` x the cross-entropy of the tied LM head on each merged image token against its words."""

        def compute_loss(self, model, batch, num_items_in_batch):
            aux = batch.pop("aux_labels", None)
            if aux is None or weight == 0 or aux.numel() == 0 or batch.get("pixel_values") is None:
                return super().compute_loss(model, batch, num_items_in_batch)
            captured = []  # the vision tower runs for images first, then for videos
            hook = model.model.visual.register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                loss = super().compute_loss(model, batch, num_items_in_batch)
            finally:
                hook.remove()
            feats = captured[0]
            if feats.shape[0] != aux.shape[0]:
                raise ValueError(f"{feats.shape[0]} image tokens but {aux.shape[0]} alignment targets")
            logp = model.lm_head(feats).float().log_softmax(-1)
            mask = aux >= 0
            nll = -(logp.gather(1, aux.clamp(min=0)) * mask).sum() / mask.sum().clamp(min=1)
            return loss + weight * nll

    return AlignedTrainer
