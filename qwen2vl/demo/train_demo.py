"""Train the bundled demo model (``qwen2vl/demo/model``, loadable as ``from_pretrained("qwen2vl-demo")``).

A Qwen2-VL-architecture model of ~4M parameters (ViT 4 x 128 with 2x2 merger, decoder 4 x 256 with M-RoPE
[8, 12, 12] over head_dim 64, GQA 4/2 heads, tied 448-row embeddings) trained from scratch with ``qwen2vl.train`` on
the synthetic shapes/words questions of ``qwen2vl.demo.data`` (112x112 images, rendered on the fly from fixed
seeds; the processor shrinks them to 56x56, 4 image tokens), on CPU.

Recipe (defaults): 2000 steps x 32 conversations of 1-3 questions, AdamW 5e-4 cosine, plus an alignment loss (the
tied LM head applied to each image token should name its quadrant's content and position: "red", "circle",
"top", "left"), then a 400-step finishing stage where half of the questions ask "What is in the <quadrant>?" (the
one skill the first stage leaves at ~50 %). Measured: 16 min on 2 CPU cores, 400/400 held-out questions right.

The output folder has the layout of a real checkpoint: config.json, generation_config.json (greedy,
eos [<|im_end|>, <|endoftext|>]), model.safetensors, tokenizer.json / vocab.json / merges.txt /
tokenizer_config.json, chat_template.json, preprocessor_config.json (+ video_preprocessor_config.json).

    python -m qwen2vl.demo.train_demo                      # the bundled model (writes qwen2vl/demo/model)
    python -m qwen2vl.demo.train_demo --out /tmp/demo --steps 200 --eval-every 100    # a quick trial

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

from . import data

# data seeds: training, eval during training, held-out test, finishing stage (uses FOCUS_SEED and FOCUS_SEED + 1)
TRAIN_SEED, EVAL_SEED, TEST_SEED, FOCUS_SEED = 1, 2, 20261125, 777
DEFAULT_OUT = Path(__file__).parent / "model"
# The demo model looks at every picture at 56x56 pixels (min = max = 56*56): a 112x112 demo picture becomes 4x4
# patches of 14 px, i.e. 2x2 merged tokens, one token per quadrant (where data.py places at most one shape). At
# 112x112 (16 tokens) each shape straddles four tokens, and the model learns several times slower (measured).
PREPROCESSOR = {
    "min_pixels": 56 * 56, "max_pixels": 56 * 56, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def _shape(shape, color, quadrant, center, extent=41):
    return {"shape": shape, "color": color, "quadrant": quadrant, "center": list(center), "extent": extent,
            "fill": list(data.COLORS[color])}


# The bundled example pictures (qwen2vl/demo/assets/exampleN.png) and questions the demo model answers about them.
EXAMPLES = {
    "example1.png": {
        "meta": {"shapes": [_shape("circle", "red", "top left", (28, 28)), _shape("square", "blue", "top right", (84, 28)),
                            _shape("triangle", "yellow", "bottom right", (84, 84))],
                 "word": None, "background": [240, 240, 235], "layout": None},
        "qa": [("How many shapes are there?", "There are 3 shapes."),
               ("What is in the top right?", "There is a blue square in the top right."),
               ("What color is the circle?", "The circle is red."),
               ("Is there a green triangle?", "No, there is no green triangle.")]},
    "example2.png": {
        "meta": {"shapes": [], "word": "CAT", "background": [240, 240, 235],
                 "layout": {"origin": [11, 38], "cell": 5, "ink": [30, 30, 30]}},
        "qa": [("What word is written in the image?", "The word is CAT.")]},
    "example3.png": {
        "meta": {"shapes": [_shape("triangle", "green", "bottom left", (28, 84))], "word": None,
                 "background": [240, 240, 235], "layout": None},
        "qa": [("Describe the image.", "A green triangle."), ("How many triangles are there?", "There is 1 triangle.")]},
}


def write_examples(directory: Path) -> list[Path]:
    """Render the EXAMPLES pictures into ``directory`` (PNG); their answers follow from data's templates."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ex in EXAMPLES.items():
        path = directory / name
        data.render(ex["meta"]).save(path, format="PNG")
        paths.append(path)
    return paths


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
    """``n`` conversations from ``data.make_dataset(n, seed)``; pictures are rendered when an item is read.

    ``max_turns`` > 1 appends up to ``max_turns - 1`` more questions about the same picture (multi-turn), drawn
    from a per-item RNG, so every item is reproducible on its own."""

    def __init__(self, n: int, seed: int, max_turns: int = 1, **kwargs):
        self.examples = data.make_dataset(n, seed, draw=False, **kwargs)
        self.seed, self.max_turns = seed, max_turns

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        meta = ex["meta"]
        image = data.render(meta) if meta["kind"] != "text_only" else None
        messages = data.to_messages(ex["question"], ex["answer"], image)
        if self.max_turns > 1 and image is not None:
            rng = random.Random(self.seed * 1_000_003 + i)
            asked = {ex["question"]}
            for _ in range(rng.randint(0, self.max_turns - 1)):
                kind = rng.choice(data.applicable_kinds(meta["shapes"], meta["word"]))
                q, a = data.question_and_answer(kind, meta["shapes"], meta["word"],
                                                data._pick_arg(rng, kind, meta["shapes"]))
                if q not in asked:
                    asked.add(q)
                    messages += data.to_messages(q, a)
        return {"messages": messages, "meta": meta}


class AlignCollator:
    """SFT batches plus ``aux_labels (n_images * 4, 4)``: for each merged image token (one per quadrant at 56 px, in
    the vision tower's order) the ids of the words naming what it shows and where: colour + shape ("red",
    "circle"), "nothing", or the written word; then "top"/"bottom" and "left"/"right"; -100 where unused."""

    def __init__(self, sft_collator):
        self.sft = sft_collator
        tok = sft_collator.tokenizer
        self.word = lambda w: tok.convert_tokens_to_ids("\u0120" + w)  # byte-level BPE: "Ġred" = " red"

    def __call__(self, records):
        batch = self.sft(records)
        rows = []
        for rec in records:
            meta = rec.get("meta")
            if meta is None or meta["kind"] == "text_only":
                continue
            by_quadrant = {s["quadrant"]: s for s in meta["shapes"]}
            for q in data.QUADRANTS:
                s = by_quadrant.get(q)
                where = [self.word(w) for w in q.split()]  # "top left" -> ids of " top", " left"
                if meta["word"] is not None:
                    rows.append([self.word(meta["word"]), -100, *where])
                elif s is None:
                    rows.append([self.word("nothing"), -100, *where])
                else:
                    rows.append([self.word(s["color"]), self.word(s["shape"]), *where])
        batch["aux_labels"] = torch.tensor(rows, dtype=torch.long).view(-1, 4)
        return batch


def _aligned_trainer(weight: float):
    from ..training.trainer import Trainer

    class AlignedTrainer(Trainer):
        """Adds ``weight`` x the cross-entropy of the tied LM head applied to each merged image token against the
        words naming its content: an alignment signal that makes image tokens word-like early in training."""

        def compute_loss(self, model, batch, num_items_in_batch):
            aux = batch.pop("aux_labels", None)
            if aux is None or weight == 0 or aux.numel() == 0:
                return super().compute_loss(model, batch, num_items_in_batch)
            captured = {}
            hook = model.model.visual.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))
            try:
                loss = super().compute_loss(model, batch, num_items_in_batch)
            finally:
                hook.remove()
            feats = captured["v"]
            if feats.shape[0] != aux.shape[0]:
                raise ValueError(f"{feats.shape[0]} image tokens but {aux.shape[0]} alignment targets "
                                 "(the demo alignment assumes 56x56 pictures: 4 tokens each)")
            logp = model.lm_head(feats).float().log_softmax(-1)
            mask = aux >= 0
            nll = -(logp.gather(1, aux.clamp(min=0)) * mask).sum() / mask.sum().clamp(min=1)
            return loss + weight * nll

    return AlignedTrainer


def generation_config(ids: dict):
    from ..generation import GenerationConfig

    return GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                            eos_token_id=list(ids["eos_token_ids"]), do_sample=False, repetition_penalty=1.0,
                            max_new_tokens=64)


@torch.no_grad()
def answer_questions(model, processor, examples: list[dict], batch_size: int = 64) -> list[str]:
    """Greedy answers (batched, left padding) for ``data`` examples (dicts with image / question)."""
    from ..training.data import SFTCollator
    from ..training.trainer import generate_answers

    collator = SFTCollator(processor)
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [{"messages": data.to_messages(ex["question"], None, ex["image"])} for ex in chunk]
        out += generate_answers(model, collator, prompts, max_new_tokens=32)
    return out


def accuracy_by_kind(examples: list[dict], answers: list[str]) -> dict:
    hits, counts = defaultdict(int), defaultdict(int)
    for ex, a in zip(examples, answers):
        counts[ex["meta"]["kind"]] += 1
        hits[ex["meta"]["kind"]] += data.answer_is_correct(a, ex["answer"])
    out = {k: hits[k] / counts[k] for k in sorted(counts)}
    out["all"] = sum(hits.values()) / max(1, sum(counts.values()))
    return out


def build(out: Path, *, steps: int, batch_size: int, lr: float, warmup: int, max_turns: int, seed: int,
          eval_every: int, eval_size: int, test_size: int, dtype: str, text_only_prob: float, align_weight: float,
          focus_steps: int, focus_kinds: list[str], focus_frac: float, focus_lr: float, **model_kw) -> dict:
    from ..model import Qwen2VLForConditionalGeneration
    from ..processing.processor import Qwen2VLProcessor
    from ..training.data import SFTCollator
    from ..training.trainer import TrainingArguments
    from .build_tokenizer import save_demo_tokenizer

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):  # a stale shard index / file from another layout must not survive
        if old.is_file():
            old.unlink()
    ids = save_demo_tokenizer(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    processor = Qwen2VLProcessor.from_pretrained(out)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(demo_config(ids, **model_kw))
    model.generation_config = generation_config(ids)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo model: {n_params / 1e6:.2f}M parameters; {steps} steps x {batch_size}", flush=True)
    train_set = DemoDataset(steps * batch_size, TRAIN_SEED, max_turns, text_only_prob=text_only_prob)
    eval_set = DemoDataset(eval_size, EVAL_SEED)
    args = TrainingArguments(
        max_steps=steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="cosine", min_lr_ratio=0.1, weight_decay=0.0,
        adam_beta2=0.98, max_grad_norm=1.0, eval_steps=eval_every, logging_steps=25, seed=seed, device="cpu")
    sft = SFTCollator(processor)
    trainer = _aligned_trainer(align_weight)(model, processor, args, train_set, eval_set,
                                             collator=AlignCollator(sft), eval_collator=sft)
    result = trainer.train()
    if focus_steps:
        # Finishing stage: binding a position to what is there ("What is in the top left?") is learnt last and
        # slowest; half of these batches ask it (measured: shape_at 47 % -> 100 % held-out, others unchanged).
        n_focus = int(focus_steps * batch_size * focus_frac)
        focus_set = torch.utils.data.ConcatDataset([
            DemoDataset(n_focus, FOCUS_SEED, max_turns, kinds=focus_kinds),
            DemoDataset(focus_steps * batch_size - n_focus, FOCUS_SEED + 1, max_turns)])
        args2 = TrainingArguments(
            max_steps=focus_steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
            learning_rate=focus_lr, warmup_steps=20, lr_scheduler_type="cosine", min_lr_ratio=0.1, weight_decay=0.0,
            adam_beta2=0.98, max_grad_norm=1.0, eval_steps=focus_steps, logging_steps=25, seed=seed + 1,
            device="cpu")
        trainer = _aligned_trainer(align_weight)(model, processor, args2, focus_set, eval_set,
                                                 collator=AlignCollator(sft), eval_collator=sft)
        result2 = trainer.train()
        result = {**result2, "tokens_per_s": result["tokens_per_s"]}
    train_s = time.perf_counter() - t0
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    test = data.make_dataset(test_size, TEST_SEED)
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)  # measure what was written
    acc = accuracy_by_kind(test, answer_questions(model, processor, test))
    summary = {"parameters": n_params, "steps": steps, "batch_size": batch_size, "lr": lr, "max_turns": max_turns,
               "align_weight": align_weight,
               "focus": {"steps": focus_steps, "kinds": focus_kinds, "frac": focus_frac, "lr": focus_lr},
               "torch_threads": torch.get_num_threads(),
               "train_wall_s": round(train_s, 1), "tokens_per_s": round(result["tokens_per_s"], 1),
               "final_train_loss": result["final_loss"], "eval": result.get("eval"),
               "held_out_accuracy": acc, "dtype": dtype}
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2vl.demo.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--max-turns", type=int, default=3, help="max questions per training conversation")
    p.add_argument("--align-weight", type=float, default=1.0,
                   help="weight of the image-token/word alignment loss (0: plain SFT)")
    p.add_argument("--focus-steps", type=int, default=400, help="finishing-stage steps (0: none)")
    p.add_argument("--focus-kinds", default="shape_at", help="comma list of question kinds the finishing stage stresses")
    p.add_argument("--focus-frac", type=float, default=0.5, help="share of finishing-stage examples of those kinds")
    p.add_argument("--focus-lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0, help="weights / shuffling seed")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--test-size", type=int, default=400, help="held-out questions answered at the end")
    p.add_argument("--text-only-prob", type=float, default=0.02)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-dim", type=int, default=128)
    a = p.parse_args(argv)
    build(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, max_turns=a.max_turns,
          seed=a.seed, eval_every=a.eval_every, eval_size=a.eval_size, test_size=a.test_size, dtype=a.dtype,
          text_only_prob=a.text_only_prob, align_weight=a.align_weight, focus_steps=a.focus_steps,
          focus_kinds=a.focus_kinds.split(","), focus_frac=a.focus_frac, focus_lr=a.focus_lr, hidden=a.hidden,
          layers=a.layers, intermediate=a.intermediate, vision_depth=a.vision_depth, vision_dim=a.vision_dim)
    if a.out.resolve() == DEFAULT_OUT.resolve():  # the bundled model comes with its example pictures
        write_examples(Path(__file__).parent / "assets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
