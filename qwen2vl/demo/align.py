"""The demo recipe's auxiliary losses: each merged image / video token should say what it shows and where it is.

Dense signals that the question answers alone give only sparsely (training-time help; the model stays a plain
Qwen2-VL model):

* **vision** (the tied LM head applied to the vision tower's output; the bundled model's recipe): for every merged
  image token (the tower's order: t-major, then row-major over the merged grid of ``*_grid_thw``), the colour and
  shape words of the shape under the token's centre ("red", "circle") or "nothing" (and no shape target) on
  background; the token under each shape's centre is labelled with that shape even when it is small. Options:
  ``centre`` adds whether a shape's centre lies in the token ("1" / "no": one token per shape, for counting and
  listing); ``region`` adds the region words of the shape under the token ("top" / "left"...: the words of its
  ``where`` answer); ``video`` labels video tokens too, from the scene halfway through their temporal patch.
* **position** (option, ``pos_weight`` > 0; not in the bundled recipe, as an image token cannot know the rows below
  it; the LM head applied to the decoder's last hidden state at each vision token): the token's row ("top" /
  "center" / "bottom") and column ("left" / "center" / "right") third.
* **motion** (``motion_weight`` > 0, with video labels; in the bundled recipe): in a ``move`` clip, the decoder's
  output at each token of the later temporal patch that shows the shape names its direction ("left" / "right" /
  "up" / "down"). The causal decoder can learn this (those tokens see the earlier patch, the M-RoPE offsets give
  the direction), and it is the comparison the "Which way does the circle move?" answers need, taught at every such
  token.
"""
from __future__ import annotations

import torch

from ..processing.video_processing import sample_frame_indices
from .scenes import REGION_PHRASES, contains, region
from .video import frame_scene

ROWS, COLS = ("top", "center", "bottom"), ("left", "center", "right")
# a region's meaning words, twice when the phrase has one ("at the top" -> top, top): the label pair per token
REGION_WORDS = {r: (ws * 2)[:2] for r, ws in (
    (r, tuple(w for w in phrase.split() if w in ("top", "bottom", "left", "right", "center")))
    for r, phrase in REGION_PHRASES.items())}


def _cell(s: dict, w: float, h: float, gh: int, gw: int) -> tuple[int, int]:
    return min(gh - 1, max(0, int(s["center"][1] / h * gh))), min(gw - 1, max(0, int(s["center"][0] / w * gw)))


def token_shapes(scene: dict, grid_hw: tuple[int, int]) -> list[dict | None]:
    """The shape under each merged token's centre (row-major), or None on background; the token under a shape's
    centre always gets that shape, even when the shape is small."""
    gh, gw = grid_hw
    w, h = scene["size"]
    out: list[dict | None] = []
    for i in range(gh):
        for j in range(gw):
            x, y = (j + 0.5) * w / gw, (i + 0.5) * h / gh
            hit = [s for s in scene["shapes"] if contains(s, x, y)]
            out.append(hit[-1] if hit else None)
    for s in scene["shapes"]:
        i, j = _cell(s, w, h, gh, gw)
        out[i * gw + j] = s
    return out


def token_targets(scene: dict, grid_hw: tuple[int, int]) -> list[tuple[str, str | None]]:
    """(colour, shape) or ("nothing", None) per merged token, for a scene seen as ``grid_hw`` merged tokens."""
    return [(s["color"], s["shape"]) if s else ("nothing", None) for s in token_shapes(scene, grid_hw)]


def region_targets(scene: dict, grid_hw: tuple[int, int]) -> list[tuple[str, str] | None]:
    """Per merged token: the words a ``where`` answer uses for the region of the shape under it ("top", "left";
    "top", "top" for "at the top"; "center", "center"), None on background or when the shape's centre sits on a
    third-line."""
    return [_region_pair(s, scene["size"]) for s in token_shapes(scene, grid_hw)]


def _region_pair(s: dict | None, size) -> tuple[str, str] | None:
    r = region(s, size) if s else None
    return None if r is None else REGION_WORDS[r]


def centre_flags(scene: dict, grid_hw: tuple[int, int]) -> list[bool]:
    """Per merged token: does a shape's centre lie in it?"""
    gh, gw = grid_hw
    w, h = scene["size"]
    flags = [False] * (gh * gw)
    for s in scene["shapes"]:
        i, j = _cell(s, w, h, gh, gw)
        flags[i * gw + j] = True
    return flags


def region_words(grid_hw: tuple[int, int]) -> list[tuple[str, str]]:
    """(row word, column word) of each merged token's centre, row-major."""
    gh, gw = grid_hw
    return [(ROWS[min(2, int((i + 0.5) / gh * 3))], COLS[min(2, int((j + 0.5) / gw * 3))])
            for i in range(gh) for j in range(gw)]


def clip_scenes(clip: dict, temporal_patches: int, patch: int = 2) -> list[dict]:
    """The scene halfway through each temporal patch of a clip (the frames the processor samples)."""
    idx = sample_frame_indices(clip["frames"], num_frames=temporal_patches * patch)
    out = []
    for k in range(temporal_patches):
        a, b = frame_scene(clip, idx[k * patch]), frame_scene(clip, idx[k * patch + patch - 1])
        for sa, sb in zip(a["shapes"], b["shapes"]):
            sb["center"] = [(u + v) / 2 for u, v in zip(sa["center"], sb["center"])]
        out.append(b)
    return out


class AlignCollator:
    """SFT batches plus ``aux_labels`` (n, 2): word ids (colour or "nothing", shape or -100) per image token, in the
    vision tower's order, and ``pos_labels`` (n, 2): row and column words, same order. ``centre``: a third aux column,
    the centre flag; ``region``: two more, the ``region_targets`` words (the tower learns where a shape is: it sees
    the whole picture, while a causal decoder's image token cannot know the grid's height); ``video``: video tokens
    too (after the image tokens). The bundled model uses centre, region and video (``train_demo --align-centre
    --align-region --align-video``), not the position loss (``--pos-weight``)."""

    def __init__(self, sft_collator, merge_size: int = 2, centre: bool = False, video: bool = False,
                 region: bool = False):
        self.sft, self.merge, self.centre, self.video, self.region = sft_collator, merge_size, centre, video, region
        self.columns = 2 + centre + 2 * region
        tok = sft_collator.tokenizer

        def word(w):  # byte-level BPE: "Ġred" = " red"; the demo tokenizer keeps these words whole
            i = tok.convert_tokens_to_ids("\u0120" + w)
            if i is None or i == getattr(tok, "unk_token_id", None):
                raise ValueError(f"the demo tokenizer has no single token for ' {w}'")
            return i

        self.word = word
        self.flag = {True: tok.convert_tokens_to_ids("1"), False: word("no")}

    def _rows(self, scene: dict, gh: int, gw: int, aux: list, pos: list) -> None:
        shapes, flags = token_shapes(scene, (gh, gw)), centre_flags(scene, (gh, gw))  # shapes: once per scene
        for s, flag, (r, c) in zip(shapes, flags, region_words((gh, gw))):
            place = _region_pair(s, scene["size"]) if self.region else None
            aux.append([self.word(s["color"]) if s else self.word("nothing"), self.word(s["shape"]) if s else -100]
                       + [self.flag[flag]] * self.centre
                       + ([self.word(w) for w in place] if place else [-100, -100]) * self.region)
            pos.append([self.word(r), self.word(c)])

    def __call__(self, records):
        batch = self.sft(records)
        aux: list = []
        pos: list = []
        metas = [r.get("meta") or {} for r in records]
        grids = batch.get("image_grid_thw")
        scenes = [m["scene"] for m in metas if m.get("scene")]
        for scene, (_, gh, gw) in zip(scenes, grids.tolist() if grids is not None else []):
            self._rows(scene, gh // self.merge, gw // self.merge, aux, pos)
        grids = batch.get("video_grid_thw") if self.video else None
        clips = [m["clip"] for m in metas if m.get("clip")]
        motion: list = []
        for clip, (t, gh, gw) in zip(clips, grids.tolist() if grids is not None else []):
            for k, scene in enumerate(clip_scenes(clip, t)):
                n = len(aux)
                self._rows(scene, gh // self.merge, gw // self.merge, aux, pos)
                moving = k > 0 and clip["event"] == "move"
                motion += [self.word(clip["direction"]) if moving and row[1] != -100 else -100 for row in aux[n:]]
        batch["aux_labels"] = torch.tensor(aux, dtype=torch.long).view(-1, self.columns)
        batch["pos_labels"] = torch.tensor(pos, dtype=torch.long).view(-1, 2)
        batch["motion_labels"] = torch.tensor(motion, dtype=torch.long)
        return batch


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    mask = labels >= 0
    return -(logp.gather(1, labels.clamp(min=0)) * mask).sum() / mask.sum().clamp(min=1)


def aligned_trainer(weight: float, pos_weight: float = 0.0, video: bool = False, motion_weight: float = 0.0):
    """A Trainer adding ``weight`` x the vision loss, ``pos_weight`` x the position loss and ``motion_weight`` x the
    motion loss (``video``: the collator labels video tokens too; the motion loss needs it)."""
    from ..training.trainer import Trainer

    class AlignedTrainer(Trainer):
        loss_parts: list

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_parts = []

        def compute_loss(self, model, batch, num_items_in_batch):
            aux, pos = batch.pop("aux_labels", None), batch.pop("pos_labels", None)
            motion = batch.pop("motion_labels", None)
            if aux is None or aux.numel() == 0 or (weight == 0 and pos_weight == 0 and motion_weight == 0) or \
                    (batch.get("pixel_values") is None and not video):
                return super().compute_loss(model, batch, num_items_in_batch)
            captured = []  # the vision tower runs for images first, then for videos
            hook = model.model.visual.register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                out = model(**batch, num_items_in_batch=num_items_in_batch)
            finally:
                hook.remove()
            feats = torch.cat(captured) if video else captured[0]
            if feats.shape[0] != aux.shape[0]:
                raise ValueError(f"{feats.shape[0]} vision tokens but {aux.shape[0]} alignment targets")
            loss, parts = out.loss, [float(out.loss.detach())]
            if weight:
                vision = _nll(model.lm_head(feats), aux)
                loss, parts = loss + weight * vision, parts + [float(vision.detach())]
            if pos_weight:
                ids = batch["input_ids"]
                cfg = model.config
                # decoder outputs at image tokens, then at video tokens: the vision tower's order
                at = out.logits[ids == cfg.image_token_id]
                if video:
                    at = torch.cat([at, out.logits[ids == cfg.video_token_id]])
                position = _nll(at, pos)
                loss, parts = loss + pos_weight * position, parts + [float(position.detach())]
            if motion_weight and video and motion is not None and bool((motion >= 0).any()):
                # the decoder's output at the moving shape's tokens of the later temporal patch names the direction
                moved = _nll(out.logits[batch["input_ids"] == model.config.video_token_id], motion.view(-1, 1))
                loss, parts = loss + motion_weight * moved, parts + [float(moved.detach())]
            self.loss_parts.append(parts)  # (answers, vision, ...) per micro-batch, for the training log
            if len(self.loss_parts) % 50 == 0:
                width = min(len(p) for p in self.loss_parts[-50:])  # batches without a moving clip: no motion part
                recent = torch.tensor([p[:width] for p in self.loss_parts[-50:]]).mean(0).tolist()
                print(f"\nlosses over the last 50 batches (answers, vision[, position][, motion]): "
                      f"{', '.join(f'{v:.3f}' for v in recent)}", flush=True)
            return loss

    return AlignedTrainer
