"""Does the demo recipe learn *where* a shape is? A short diagnostic training for issue #18 (not a test).

Trains (or fine-tunes) a demo-sized model on position questions only ("Where is the circle?") with the vision
alignment loss, then prints held-out accuracy per kind and the answers' distribution. Options isolate the causes:

    python benchmarks/demo_position_probe.py --canvas 224x224 --shapes 1 --theta 10 --steps 200     # fixed 3x3 grid
    python benchmarks/demo_position_probe.py --shapes 1 --theta 10 --steps 300                      # any canvas
    python benchmarks/demo_position_probe.py --init qwen2vl/demo/model --lr 5e-4 --steps 150 \
        --kinds where,what_at --grid-aux 1 --grid-layer 1                                            # shipped model

``--theta`` sets the decoder's rope_theta (the demo's 10000 leaves the w section of M-RoPE with rotations of
< 0.006 rad per position step); ``--grid-aux W`` adds a loss making the decoder's hidden state at each image token
(after layer ``--grid-layer``, through the final norm and the tied head) name its row and column index as digits,
and at the ``<|vision_end|>`` token the merged grid's height and width. Measured 2026-12-06 (Zen 4, 2 threads,
bf16 autocast, batch 32): fixed 224x224 canvas, one shape, from scratch: where 88 % after 200 steps (152 s);
the same canvas with the demo's 1-6 shapes: 25 % (mostly "bottom right");
any canvas (56-448 px, 4-12 tokens), one shape: a constant "in the center" (55 %, the prior) after 300 steps
with theta 10 or 10000, also when started from the fixed-canvas model; the shipped model fine-tuned 150-450 steps
on where / what_at: what_at 80 %, where 18-24 % with or without theta 10, grid-aux at layer 1 or the last layer,
or up to 64 visual tokens (``--pixels 3136 50176 12544``).

Why, and what moved it (2026-12-06, later session, same machine): on a plain background the vision tower is
translation-equivariant (no absolute position embedding, 2D RoPE only), so only shape tokens can sense where the
canvas edges are, and a causal decoder's image token cannot know the grid's height (the rows below it come later).
``--region`` makes the tower name the region words of the shape under every token (the numbers here come from an
ad-hoc copy of this script with the same settings; the options were folded in afterwards); trained alone
(``--vision-steps 1200``, 3.4 min) it names them right at 85-89 % of the labelled tokens. Then, one shape, any
canvas, where only: 85 % after 400 steps (``--region --vision-steps 1200 --shapes 1 --steps 400``; without the
region labels: the constant "center", 55-58 %). Training the tied LM head in that tower-only stage (as the stage
did before) left embeddings the decoder learnt ~10x slower from (answer loss 1.95 vs 0.19 after 150 steps), so the
stage now trains the tower alone. With 1-6 shapes the decoder must also find the named shape first, and that
lookup stays slow: where / what_at 16 / 24 % after 300 steps (measured from a tower stage that still trained the
LM head, so a lower bound; not rerun). In the full recipe (train_demo ``--align-region``, 29 min) where reached
29 % on the training generator, 50 % on the second renderer. (Tried and dropped: "mimetic" identity
initialisation of the decoder's query / key maps on the low-frequency rotary dims: colour / exists / count_color
26 / 17 / 41 % vs 77 / 51 / 46 % without, 300 steps.)
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import torch

from qwen2vl.demo import data, scenes, train_demo as td
from qwen2vl.demo.align import AlignCollator, _nll
from qwen2vl.model import Qwen2VLForConditionalGeneration
from qwen2vl.processing.processor import Qwen2VLProcessor
from qwen2vl.training.data import SFTCollator


def grid_targets(batch: dict, cfg, digit: list[int]) -> torch.Tensor:
    """(B, S, 2) word ids: an image token's row / column index, the <|vision_end|> after it the grid's h / w."""
    ids = batch["input_ids"]
    out = torch.full((*ids.shape, 2), -100, dtype=torch.long)
    grids = batch.get("image_grid_thw")
    k = 0
    for r in range(ids.shape[0]):
        pos = (ids[r] == cfg.image_token_id).nonzero().flatten().tolist()
        if not pos:
            continue
        gh, gw = grids[k, 1].item() // 2, grids[k, 2].item() // 2
        k += 1
        for n, p in enumerate(pos):
            out[r, p] = torch.tensor([digit[min(9, n // gw)], digit[min(9, n % gw)]])
        out[r, pos[-1] + 1] = torch.tensor([digit[min(9, gh)], digit[min(9, gw)]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="where")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--canvas", default=None, help="WxH: every picture this size (default: the demo's 56-448 px)")
    p.add_argument("--shapes", type=int, default=None, help="shapes per picture (default: the demo's 1-6)")
    p.add_argument("--pixels", type=int, nargs=3, default=None, metavar=("IMAGE_MIN", "IMAGE_MAX", "VIDEO_MAX"))
    p.add_argument("--grid-aux", type=float, default=0.0)
    p.add_argument("--grid-layer", type=int, default=-1, help="hidden state index for --grid-aux (-1: last)")
    p.add_argument("--region", action="store_true",
                   help="alignment: the tower also names the region of the shape under each token (align.region_targets)")
    p.add_argument("--vision-steps", type=int, default=0, help="first train the tower alone (vision_stage) this long")
    p.add_argument("--init", default=None, help="start from this checkpoint")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--out", default="/tmp/demo-position-probe")
    a = p.parse_args()
    if a.canvas or a.shapes:  # narrow the scene sampler the data module draws from
        size = [int(v) for v in a.canvas.split("x")] if a.canvas else None
        sample = scenes.sample_scene
        data.sample_scene = lambda rng, n=None, s=None, big=False: sample(rng, a.shapes or n, size or s, big)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = td.write_configs(out, a.pixels)
    proc = Qwen2VLProcessor.from_pretrained(out)
    torch.manual_seed(0)
    if a.init:
        model = Qwen2VLForConditionalGeneration.from_pretrained(a.init, dtype=torch.float32)
        config = model.config
    else:
        config = td.demo_config(ids)
    config.text_config.rope_parameters["rope_theta"] = a.theta
    model = model if a.init else Qwen2VLForConditionalGeneration(config)
    model.generation_config = td.generation_config(ids)
    kinds = a.kinds.split(",")
    train = td.DemoDataset(a.steps * a.batch_size, 1, 4, 2, kinds=kinds, video_prob=0.0, text_only_prob=0.0)
    collate = AlignCollator(SFTCollator(proc), region=a.region)
    if a.vision_steps:
        from qwen2vl.demo.vision_stage import train_vision

        pictures = td.DemoDataset(a.vision_steps * a.batch_size, td.VISION_SEED, video_prob=0.0, text_only_prob=0.0)
        train_vision(model, collate, pictures, steps=a.vision_steps, batch_size=a.batch_size, lr=2e-3, bf16=True)
    digit = [proc.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    opt = torch.optim.AdamW(model.parameters(), a.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for s in range(a.steps):
        batch = collate([train[s * a.batch_size + i] for i in range(a.batch_size)])
        aux = batch.pop("aux_labels")
        batch.pop("pos_labels"), batch.pop("motion_labels")
        grid = grid_targets(batch, model.config, digit) if a.grid_aux else None
        for g in opt.param_groups:  # warmup 30, cosine to 0.1
            g["lr"] = a.lr * min(1, (s + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / a.steps)))
        feats = []
        hook = model.model.visual.register_forward_hook(lambda m, i, o: feats.append(o))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = model(**batch, output_hidden_states=grid is not None)
            loss = o.loss + _nll(model.lm_head(feats[0]), aux)
            if grid is not None:
                m = grid[..., 0] >= 0
                h = o.hidden_states[a.grid_layer][m]
                h = model.model.language_model.norm(h) if a.grid_layer >= 0 else h
                loss = loss + a.grid_aux * _nll(model.lm_head(h), grid[m])
        hook.remove()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % 50 == 0:
            print(f"step {s + 1}: answers {o.loss.item():.3f}, all {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    test = [ex for ex in td.held_out_set(a.eval_n * 4, video_prob=0.0) if ex["meta"]["kind"] in kinds][:a.eval_n]
    answers = td.answer_questions(model, proc, test)
    acc = td.accuracy_by_kind(test, answers)
    print(json.dumps({k: round(v, 3) for k, v in acc.items()}))
    print("most common answers (content words):", collections.Counter(" ".join(data.meaning(x)) for x in answers).most_common(6))


if __name__ == "__main__":
    main()
