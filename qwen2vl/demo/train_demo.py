"""Train the bundled demo model (``qwen2vl/demo/model``, loadable as ``from_pretrained("qwen2vl-demo")``).

A Qwen2-VL-architecture model of ~4.4M parameters (ViT 4 x 128 with 2x2 merger, decoder 4 x 256 with M-RoPE
[8, 12, 12] over head_dim 64, GQA 4/2 heads, tied embeddings) trained from scratch with ``qwen2vl.train`` on CPU
on ``qwen2vl.demo.data``: pictures of 1-6 shapes on canvases of 56-448 px a side at many aspect ratios (the
processor keeps their aspect and gives them 4-12 visual tokens: naive dynamic resolution), several phrasings per
question kind, and short clips through the video processor (4 sampled frames -> 2 temporal patches).

Recipe (the bundled model; 29.2 minutes of wall time on 2 cores): the vision tower alone first (``vision_stage``,
1200 steps x 32 pictures) on the alignment loss (the tied LM head applied to each image token names the colour,
shape, centre flag and region words of the shape under it, ``align``), then everything on conversations of 2-4
questions about one picture or clip (3200 steps x 16, AdamW cosine at 1e-3) with the alignment loss on image and
video tokens and the motion loss on moving clips:

    python -m qwen2vl.demo.train_demo --threads 2 --bf16 --vision-steps 1200 --vision-lr 2e-3 \
        --vision-batch-size 32 --steps 3200 --batch-size 16 --lr 1e-3 --warmup 40 --min-turns 2 --max-turns 4 \
        --align-centre --align-region --align-video --motion-weight 1 --eval-every 0

(``--checkpoint-dir`` keeps ``checkpoint-<step>`` folders and the final float32 weights, which ``--init-from``
starts a further stage from; without ``--out`` the result goes to qwen2vl/demo/model with the example pictures.)
    python -m qwen2vl.demo.train_demo --out /tmp/demo --steps 200 --eval-every 100    # a quick trial

Options (those above are the bundled model's): ``--align-centre`` (a third alignment word per image token: does a
shape's centre lie in it), ``--align-region`` (two more: the region words of the shape under it), ``--align-video``
(video tokens labelled too), ``--pos-weight W`` (the decoder's output at each vision token names its row / column
third), ``--pixels MIN MAX VIDEO_MAX`` (processor bounds, e.g. 12544 28224 12544 for 16-36 tokens),
``--min-turns``, ``--bf16`` (autocast, ~1.4x fewer CPU seconds per step on AVX512-BF16), ``--threads``,
``--num-workers``, ``--vision-steps N [--vision-lr --vision-batch-size --vision-min-lr --vision-shape-weight]``
(first N steps train the vision tower alone on the alignment loss, ``vision_stage``; ``--steps 0`` stops there),
``--motion-weight`` (``align``), ``--bucket`` (batches of similar vision-token counts), ``--vision-lr-scale``,
``--freeze-vision``, ``--min-lr-ratio``; ``--export CHECKPOINT`` writes a checkpoint folder as the demo model.

Reproducible: fixed seeds for the tokenizer corpus, the weights, the data and the shuffling (bit-exact results
also need the same torch version and thread count).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from . import data, questions as qs, video as vid
from .align import AlignCollator, aligned_trainer
from .examples import write_examples

# data seeds: training, eval during training, held-out test
TRAIN_SEED, EVAL_SEED, TEST_SEED = 1, 2, 20261125
VISION_SEED = 5  # pictures of the optional vision-only stage (--vision-steps)
DEFAULT_OUT = Path(__file__).parent / "model"
_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
# Pictures keep their aspect ratio and get 56*56 .. 98*98 pixels: 4 to 12 merged tokens (a 640x480 drawing ->
# 112x84, 12 tokens; 224x224 -> 84x84, 9 tokens). Clips: 4 frames sampled from any length, <= 84*84 each.
PREPROCESSOR = {"min_pixels": 56 * 56, "max_pixels": 98 * 98, **_NORM,
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
VIDEO_PREPROCESSOR = {"min_pixels": 56 * 56, "max_pixels": 84 * 84, "num_frames": vid.SAMPLED_FRAMES,
                      "do_sample_frames": True, **_NORM, "video_processor_type": "Qwen2VLVideoProcessor",
                      "processor_class": "Qwen2VLProcessor"}


def demo_config(ids: dict, hidden: int = 256, layers: int = 4, intermediate: int = 688, vision_depth: int = 4,
                vision_dim: int = 128):
    from ..configuration import Qwen2VLConfig

    heads = 4
    half = hidden // heads // 2  # rotary frequencies per head; split t/h/w like the real [16, 24, 24] of 64
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return Qwen2VLConfig(
        text_config=dict(vocab_size=ids["model_vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": section}, tie_word_embeddings=True,
                         bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         pad_token_id=ids["pad_token_id"], use_sliding_window=False),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=4, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        vision_token_id=ids["vision_token_id"], tie_word_embeddings=True)


class DemoDataset:
    """``n`` conversations from ``data.make_dataset(n, seed)``; pictures / clips are rendered when an item is read.

    ``max_turns`` > 1 appends up to ``max_turns - 1`` more questions about the same picture or clip (multi-turn),
    drawn from a per-item RNG, so every item is reproducible on its own."""

    def __init__(self, n: int, seed: int, max_turns: int = 1, min_turns: int = 1, **kwargs):
        self.examples = data.make_dataset(n, seed, draw=False, **kwargs)
        self.seed, self.max_turns, self.min_turns = seed, max_turns, min(min_turns, max_turns)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        meta = ex["meta"]
        ex = {**ex, "image": data.render(meta), "video": data.render_video(meta)}
        messages = data.example_messages(ex)
        rng = random.Random(self.seed * 1_000_003 + i)
        asked = {ex["question"]}
        for _ in range(rng.randint(self.min_turns - 1, self.max_turns - 1) if meta["kind"] != "text_only" else 0):
            if meta["scene"]:
                kinds = qs.applicable_kinds(meta["scene"])
                q, a, _ = qs.ask(rng, rng.choices(kinds, [qs.KIND_WEIGHTS.get(k, 1.0) for k in kinds])[0],
                                 meta["scene"])
            else:
                q, a = vid.ask_video(rng, rng.choice(vid.EVENT_KINDS[meta["clip"]["event"]]), meta["clip"])
            if q not in asked:
                asked.add(q)
                messages += data.to_messages(q, a)
        return {"messages": messages, "meta": meta}

    def vision_tokens(self, image_pixels: tuple[int, int], video_pixels: tuple[int, int]) -> list[int]:
        """Merged vision tokens of each item under these (min, max) pixel bounds (no rendering needed)."""
        from ..processing.image_processing import smart_resize

        out = []
        for ex in self.examples:
            meta = ex["meta"]
            media = meta["scene"] or meta["clip"]
            if media is None:
                out.append(0)
                continue
            w, h = media["size"]
            hh, ww = smart_resize(h, w, 28, *(image_pixels if meta["scene"] else video_pixels))
            out.append(hh * ww // 28 ** 2 * (1 if meta["scene"] else vid.SAMPLED_FRAMES // 2))
        return out


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, pool: int = 16) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort each pool of ``pool`` batches by length,
    cut it into batches, shuffle the batches. Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    for a in range(0, len(order), batch_size * pool):
        chunk = sorted(order[a:a + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def recipe_trainer(trainer_cls, lengths: list[int] | None = None, vision_lr_scale: float = 1.0):
    """``trainer_cls`` whose training loader draws ``bucketed_batches`` when ``lengths`` are given (evaluation
    loaders are unchanged) and whose vision tower learns at ``vision_lr_scale`` x the rate (a tower trained by the
    vision stage is not shaken by the gradients of a still-random decoder)."""

    class RecipeTrainer(trainer_cls):
        def _loader(self, dataset, batch_size, shuffle, seed=0, collate=None):
            if lengths is None or dataset is not self.train_dataset or not shuffle:
                return super()._loader(dataset, batch_size, shuffle, seed, collate)
            return torch.utils.data.DataLoader(dataset, batch_sampler=bucketed_batches(lengths, batch_size, seed),
                                               collate_fn=collate or self.collator, num_workers=self.args.num_workers)

        def create_optimizer(self):
            opt = super().create_optimizer()
            if vision_lr_scale == 1.0:
                return opt
            visual = {id(p) for p in self.model.model.visual.parameters()}
            groups, opt.param_groups = opt.param_groups, []
            for g in groups:  # split each group into its vision and other parameters (no optimizer state yet)
                for is_vis in (False, True):
                    params = [p for p in g["params"] if (id(p) in visual) == is_vis]
                    if params:
                        opt.add_param_group({**g, "params": params,
                                             "lr": g["lr"] * (vision_lr_scale if is_vis else 1.0)})
            return opt

    return RecipeTrainer


def generation_config(ids: dict):
    from ..generation import GenerationConfig

    return GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                            eos_token_id=list(ids["eos_token_ids"]), do_sample=False, repetition_penalty=1.0,
                            max_new_tokens=64)


@torch.no_grad()
def answer_questions(model, processor, examples: list[dict], batch_size: int = 64) -> list[str]:
    """Greedy answers (batched, left padding) for ``data`` examples (dicts with image or video, question)."""
    from ..training.data import SFTCollator
    from ..training.trainer import generate_answers

    collator = SFTCollator(processor)
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [{"messages": data.example_messages(ex, with_answer=False)} for ex in chunk]
        out += generate_answers(model, collator, prompts, max_new_tokens=32)
    return out


def accuracy_by_kind(examples: list[dict], answers: list[str]) -> dict:
    """Share of answers with the gold answer's meaning (``data.answer_is_correct``), per kind and overall."""
    hits, counts = defaultdict(int), defaultdict(int)
    for ex, a in zip(examples, answers):
        kind = ex["meta"]["kind"]
        counts[kind] += 1
        hits[kind] += data.answer_is_correct(a, ex["answer"], kind)
    out = {k: hits[k] / counts[k] for k in sorted(counts)}
    out["all"] = sum(hits.values()) / max(1, sum(counts.values()))
    return out


def held_out_set(n: int, seed: int = TEST_SEED, video_prob: float = 0.25) -> list[dict]:
    return data.make_dataset(n, seed, video_prob=video_prob, text_only_prob=0.02)


def write_configs(out: Path, pixels: tuple[int, int, int] | None = None) -> dict:
    """Tokenizer and processor configs; ``pixels`` = (image min, image max, video max) overrides the defaults."""
    from .build_tokenizer import save_demo_tokenizer

    ids = save_demo_tokenizer(str(out))
    image, video = dict(PREPROCESSOR), dict(VIDEO_PREPROCESSOR)
    if pixels:
        image["min_pixels"], image["max_pixels"], video["max_pixels"] = pixels
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    return ids


def build(out: Path, *, steps: int, batch_size: int, lr: float, warmup: int, max_turns: int, seed: int,
          eval_every: int, eval_size: int, test_size: int, dtype: str, text_only_prob: float, video_prob: float,
          align_weight: float, save_every: int, checkpoint_dir: str | None, init_from: str | None = None,
          data_seed: int = TRAIN_SEED, pos_weight: float = 0.0, pixels=None, num_workers: int = 0,
          min_turns: int = 1, bf16: bool = False, align_centre: bool = False, align_video: bool = False,
          vision_steps: int = 0, vision_lr: float = 2e-3, vision_min_lr: float = 1.0, min_lr_ratio: float = 0.1,
          freeze_vision: bool = False, bucket: bool = False, vision_lr_scale: float = 1.0,
          vision_batch_size: int | None = None, vision_shape_weight: float = 1.0, motion_weight: float = 0.0,
          align_region: bool = False, **model_kw) -> dict:
    from ..model import Qwen2VLForConditionalGeneration
    from ..processing.processor import Qwen2VLProcessor
    from ..training.data import SFTCollator
    from ..training.trainer import TrainingArguments

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):  # a stale shard index / file from another layout must not survive
        if old.is_file():
            old.unlink()
    ids = write_configs(out, pixels)
    processor = Qwen2VLProcessor.from_pretrained(out)
    torch.manual_seed(seed)
    if init_from:  # a further stage: same tokenizer (deterministic), weights from an earlier run's checkpoint
        model = Qwen2VLForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
    else:
        model = Qwen2VLForConditionalGeneration(demo_config(ids, **model_kw))
    model.generation_config = generation_config(ids)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo model: {n_params / 1e6:.2f}M parameters; {steps} steps x {batch_size}", flush=True)
    mix = dict(video_prob=video_prob, text_only_prob=text_only_prob)
    train_set = DemoDataset(steps * batch_size, data_seed, max_turns, min_turns, **mix)
    eval_set = DemoDataset(eval_size, EVAL_SEED, **mix)
    args = TrainingArguments(
        max_steps=steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="cosine", min_lr_ratio=min_lr_ratio, weight_decay=0.0,
        adam_beta2=0.98, max_grad_norm=1.0, eval_steps=eval_every, logging_steps=25, seed=seed, device="cpu",
        output_dir=checkpoint_dir, save_steps=save_every if checkpoint_dir else 0, num_workers=num_workers, bf16=bf16,
        freeze_vision_tower=freeze_vision)
    sft = SFTCollator(processor)
    collator = AlignCollator(sft, centre=align_centre, video=align_video, region=align_region)
    if vision_steps:  # stage 0: the vision tower + LM head alone on the alignment loss, pictures only
        from .vision_stage import train_vision

        vb = vision_batch_size or batch_size
        pictures = DemoDataset(vision_steps * vb, VISION_SEED, video_prob=0.0, text_only_prob=0.0)
        train_vision(model, collator, pictures, steps=vision_steps, batch_size=vb, lr=vision_lr, bf16=bf16,
                     min_lr_ratio=vision_min_lr, shape_weight=vision_shape_weight)
    result = {"tokens_per_s": 0.0, "final_loss": None}
    if steps:  # steps 0: the vision stage alone (its weights go to --out, a later --init-from continues)
        lengths = None
        if bucket:  # batches of similar vision-token counts
            bounds = pixels or (PREPROCESSOR["min_pixels"], PREPROCESSOR["max_pixels"],
                                VIDEO_PREPROCESSOR["max_pixels"])
            lengths = train_set.vision_tokens(bounds[:2], (VIDEO_PREPROCESSOR["min_pixels"], bounds[2]))
        trainer_cls = recipe_trainer(aligned_trainer(align_weight, pos_weight, align_video, motion_weight), lengths,
                                     vision_lr_scale)
        trainer = trainer_cls(model, processor, args, train_set, eval_set, collator=collator, eval_collator=sft)
        result = trainer.train()
    train_s = time.perf_counter() - t0
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_configs(out, pixels)  # the exact processor configs (save_pretrained writes every default as well)
    test = held_out_set(test_size)
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)  # measure what was written
    acc = accuracy_by_kind(test, answer_questions(model, processor, test))
    summary = {"parameters": n_params, "steps": steps, "batch_size": batch_size, "lr": lr, "max_turns": max_turns,
               "align_weight": align_weight, "pos_weight": pos_weight, "min_turns": min_turns, "bf16": bf16,
               "align_centre": align_centre, "align_video": align_video, "align_region": align_region,
               "vision_steps": vision_steps,
               "vision_lr": vision_lr, "vision_min_lr": vision_min_lr, "vision_batch_size": vision_batch_size,
               "vision_shape_weight": vision_shape_weight, "min_lr_ratio": min_lr_ratio, "motion_weight": motion_weight,
               "freeze_vision": freeze_vision, "bucket": bucket, "vision_lr_scale": vision_lr_scale,
               "pixels": pixels, "video_prob": video_prob, "torch_threads": torch.get_num_threads(),
               "train_wall_s": round(train_s, 1), "tokens_per_s": round(result["tokens_per_s"], 1),
               "final_train_loss": result["final_loss"], "eval": result.get("eval"),
               "held_out_accuracy": acc, "dtype": dtype}
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def export(checkpoint: str, out: Path = DEFAULT_OUT, dtype: str = "bfloat16") -> Path:
    """Write a training checkpoint folder as the demo model: weights in ``dtype``, the exact processor configs."""
    from ..model import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    preprocessor = json.loads((Path(checkpoint) / "preprocessor_config.json").read_text())
    video = json.loads((Path(checkpoint) / "video_preprocessor_config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    write_configs(out, (preprocessor["min_pixels"], preprocessor["max_pixels"], video["max_pixels"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2vl.demo.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--max-turns", type=int, default=3, help="max questions per training conversation")
    p.add_argument("--align-weight", type=float, default=1.0,
                   help="weight of the image-token/word alignment loss (0: plain SFT)")
    p.add_argument("--seed", type=int, default=0, help="weights / shuffling seed")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=400, help="held-out questions answered at the end")
    p.add_argument("--text-only-prob", type=float, default=0.02)
    p.add_argument("--video-prob", type=float, default=0.2)
    p.add_argument("--save-every", type=int, default=250, help="checkpoint interval (with --checkpoint-dir)")
    p.add_argument("--checkpoint-dir", default=None, help="where to write checkpoint-<step> folders")
    p.add_argument("--init-from", default=None, help="continue from this checkpoint (a second stage)")
    p.add_argument("--data-seed", type=int, default=TRAIN_SEED, help="training data seed (another one per stage)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--pos-weight", type=float, default=0.0, help="weight of the token-position loss")
    p.add_argument("--motion-weight", type=float, default=0.0,
                   help="weight of the motion loss (with --align-video): moving shapes name their direction")
    p.add_argument("--align-centre", action="store_true", help="alignment: also each image token's centre flag")
    p.add_argument("--align-video", action="store_true", help="alignment: video tokens too")
    p.add_argument("--align-region", action="store_true",
                   help="alignment: also the region words of the shape under each vision token")
    p.add_argument("--pixels", type=int, nargs=3, default=None, metavar=("IMAGE_MIN", "IMAGE_MAX", "VIDEO_MAX"),
                   help="processor pixel bounds (default: the bundled model's)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers rendering the pictures")
    p.add_argument("--min-turns", type=int, default=1, help="min questions per training conversation")
    p.add_argument("--bf16", action="store_true",
                   help="train under bfloat16 autocast (fp32 weights; about 1.4x faster on AVX512-BF16 CPUs)")
    p.add_argument("--vision-steps", type=int, default=0,
                   help="first train the vision tower + LM head alone on the alignment loss for N steps")
    p.add_argument("--vision-lr", type=float, default=2e-3, help="learning rate of the vision-only stage")
    p.add_argument("--vision-batch-size", type=int, default=None, help="pictures per vision-stage step")
    p.add_argument("--vision-shape-weight", type=float, default=1.0,
                   help="vision stage: weight of the shape words in the alignment loss (colours / background: 1)")
    p.add_argument("--vision-min-lr", type=float, default=1.0,
                   help="the vision stage's rate decays (cosine) to this fraction of --vision-lr (1: constant)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decay's floor, a fraction of --lr")
    p.add_argument("--freeze-vision", action="store_true",
                   help="the full training leaves the ViT blocks as they are (the merger still trains)")
    p.add_argument("--bucket", action="store_true", help="batch conversations of similar vision-token counts")
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="the vision tower's learning rate in the full training, a fraction of --lr")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--export", default=None, metavar="CHECKPOINT",
                   help="no training: write this checkpoint folder to --out as the demo model")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-dim", type=int, default=128)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.export:
        export(a.export, a.out, a.dtype)
    else:
        build(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, max_turns=a.max_turns,
              min_turns=a.min_turns, seed=a.seed, eval_every=a.eval_every, eval_size=a.eval_size,
              test_size=a.test_size, dtype=a.dtype, text_only_prob=a.text_only_prob, video_prob=a.video_prob,
              align_weight=a.align_weight, pos_weight=a.pos_weight, save_every=a.save_every,
              checkpoint_dir=a.checkpoint_dir, init_from=a.init_from, data_seed=a.data_seed, pixels=a.pixels,
              num_workers=a.num_workers, bf16=a.bf16, align_centre=a.align_centre, align_video=a.align_video,
              vision_steps=a.vision_steps, vision_lr=a.vision_lr, vision_min_lr=a.vision_min_lr,
              min_lr_ratio=a.min_lr_ratio, freeze_vision=a.freeze_vision, bucket=a.bucket,
              vision_lr_scale=a.vision_lr_scale, vision_batch_size=a.vision_batch_size,
              vision_shape_weight=a.vision_shape_weight, motion_weight=a.motion_weight,
              align_region=a.align_region, hidden=a.hidden,
              layers=a.layers, intermediate=a.intermediate, vision_depth=a.vision_depth, vision_dim=a.vision_dim)
    if a.out.resolve() == DEFAULT_OUT.resolve():  # the bundled model comes with its example pictures
        write_examples(Path(__file__).parent / "assets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
