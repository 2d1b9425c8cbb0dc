"""LoRA fine-tuning of a demo checkpoint on a question kind it was never trained on (issue #20 acceptance), and
the per-step speed of LoRA against full fine-tuning.

The new kind, "filled": "Is the circle filled?" -> "Yes, it is." / "Is the circle outlined?" -> "No, it is
not.", about a shape named as the colour questions name it ("the shape", "the circle"
when it is the only circle, "the biggest shape") on pictures of 1-2 shapes (``--max-shapes``: what the base model
reads well), half of the targets filled and half outlined, either word asked. The answer is fully determined by
the scene: the target's ``outline`` width (0 = filled). The demo model was never asked about it, but 30 % of its
training shapes were outlined, so its vision tower had to tell a ring from a disc to name their shape and colour
(a linear probe on its pooled visual tokens tells filled from outlined in 97 % of single-shape pictures): the
information is in the visual tokens, and the decoder already finds "the circle" among them for colour questions.
Why this answer form: the demo tokenizer (576 tokens) holds neither "filled" nor "outlined" (5 and 7 single
letters or pairs); answers naming the state ("The circle is outlined.", "Yes, the circle is filled.") make the
adapters learn to spell words the frozen embeddings never produced (0 % after 300 steps, 21 % after 120 steps on
the new kind alone, misspelt), which is not what the acceptance is about; "Yes, it is." / "No, it is not." are
words the model says, and the decision is the first answer token.

Training mixes the new kind (``--new-share``) with conversations of the old kinds drawn as the demo model's own
training data (pictures, clips, text-only), so those are kept. Reported (JSON lines, then a summary):
* held-out accuracy on the new kind (``filled_correct``: the gold answer's yes / no, nothing else named)
  before and after the LoRA fine-tune, and on the old kinds (``train_demo.held_out_set``: the README's held-out
  set, ``data.answer_is_correct``) before and after, with the retention after / before;
* seconds per optimizer step (forward, backward, clipping, AdamW; the batch already collated) of full fine-tuning,
  full fine-tuning with the vision tower frozen, and LoRA on the decoder's projections (``--lora-target``; all
  seven by default, as ``qwen2vl train``; the vision tower frozen, as PEFT leaves it), each run through
  ``Trainer.training_step`` on the same batches, interleaved step by step (the order rotating) so that a load
  change on a shared machine hits all three alike; medians, the first step dropped; wall and process CPU
  seconds. Data loading (rendering + processor, the same for all) is timed apart.

    python benchmarks/bench_lora_demo.py [--model qwen2vl-demo] [--steps 250] [--lr 2e-3] [--lora-target q_proj v_proj]

Not a test: CPU minutes (tests/test_bench_lora_demo.py guards the data generator and adapter-only training).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time

import torch

from qwen2vl import AutoProcessor, Qwen2VLForConditionalGeneration
from qwen2vl.demo import data, questions as qs, scenes
from qwen2vl.demo.train_demo import accuracy_by_kind, answer_questions, held_out_set
from qwen2vl.train import Trainer, TrainingArguments

NEW_KIND = "filled"
PHRASINGS = ("Is {t} {w}?", "Is {t} drawn {w}?", "Is {t} {w} or not?", "Would you say {t} is {w}?",
             "Tell me, is {t} {w}?", "Is {t} shown {w}?")
OUTLINE_WORDS = ("filled", "outlined")
TRAIN_SEED, NEW_TEST_SEED, TIMING_SEED = 41, 43, 47  # none used by the demo model's training (train_demo)


# ----------------------------------------------------------------------------------------------- the new kind
def filled_answer(scene: dict, arg) -> str:
    """The answer to "Is {target} {word}?" for ``arg = [target, word]`` (target one of
    ``questions.targets("color", scene)``, "the circle"; word "filled" or "outlined"): "Yes, it is." / "No, it is
    not." (words the demo tokenizer holds; see the module's docstring)."""
    phrase, word = arg
    target = dict(qs.targets("color", scene))[phrase]
    return "Yes, it is." if (target["outline"] > 0) == (word == "outlined") else "No, it is not."


def filled_example(rng: random.Random, max_shapes: int = 2, draw: bool = True) -> dict:
    """A new-kind example in ``data``'s form; the target is filled or outlined with even odds (an outline as wide
    as ``scenes.sample_shapes`` draws it), the other shapes as sampled; the question asks either word."""
    while True:
        scene = scenes.sample_scene(rng, n=rng.randint(1, max_shapes))
        options = qs.targets("color", scene)
        if options:
            break
    phrase, target = rng.choice(options)  # target is the scene's own shape dict
    target["outline"] = 0 if rng.random() < 0.5 else max(2, round(target["extent"] * rng.uniform(0.07, 0.14)))
    arg = [phrase, rng.choice(OUTLINE_WORDS)]
    question = rng.choice(PHRASINGS).format(t=phrase, w=arg[1])
    return {"image": scenes.render(scene) if draw else None, "video": None, "question": question,
            "answer": filled_answer(scene, arg), "meta": {"kind": NEW_KIND, "arg": arg, "scene": scene, "clip": None}}


def filled_correct(pred: str, gold: str) -> bool:
    """The gold answer's yes / no and nothing more (``data.same_meaning``): naming a shape or colour, or a filled /
    outlined word the gold answer lacks, makes an answer wrong."""
    words = lambda s: [w for w in re.findall(r"[a-z]+", s.lower()) if w in OUTLINE_WORDS]  # noqa: E731
    return data.same_meaning(pred, gold) and words(pred) == words(gold)


def new_kind_accuracy(examples: list[dict], answers: list[str]) -> dict:
    """Overall and by the number of shapes in the picture."""
    hits = [filled_correct(a, ex["answer"]) for ex, a in zip(examples, answers)]
    out = {"all": sum(hits) / max(1, len(hits))}
    for n in sorted({len(ex["meta"]["scene"]["shapes"]) for ex in examples}):
        sel = [h for h, ex in zip(hits, examples) if len(ex["meta"]["scene"]["shapes"]) == n]
        out[f"{n}_shapes"] = sum(sel) / len(sel)
    return out


def training_examples(n: int, new_share: float, seed: int, max_shapes: int = 2) -> list[dict]:
    """``n`` undrawn examples: the new kind with probability ``new_share``, else an old-kind example drawn as
    the demo model's training data (``held_out_set``'s shares of clips and text-only questions)."""
    rng = random.Random(seed)
    return [filled_example(rng, max_shapes, draw=False) if rng.random() < new_share
            else data.make_example(rng, video_prob=0.25, text_only_prob=0.02, draw=False) for _ in range(n)]


class Conversations(torch.utils.data.Dataset):
    """Training records ``{"messages": [...]}`` of undrawn examples, pictures / clips drawn when read."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {"messages": data.example_messages(
            {**ex, "image": data.render(ex["meta"]), "video": data.render_video(ex["meta"])})}


# ----------------------------------------------------------------------------------------------- speed
def lora_args(a) -> dict:
    return {"lora_r": a.lora_r, "lora_alpha": 2.0 * a.lora_r, "lora_target": a.lora_target}


SETUPS = {"full": {}, "full_frozen_vision": {"freeze_vision_tower": True}, "lora": None}  # lora: from --lora-r


def time_steps(model_path: str, processor, dataset, a) -> dict:
    """Median seconds per optimizer step of each set-up on the same ``a.timing_steps`` batches, interleaved."""
    trainers = {}
    for name, extra in SETUPS.items():
        extra = extra if extra is not None else lora_args(a)
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype="float32")
        args = TrainingArguments(per_device_train_batch_size=a.batch_size, learning_rate=1e-5, progress=False,
                                 bf16=a.bf16, **extra)
        trainers[name] = Trainer(model, processor, args, dataset)
        trainers[name].prepare(a.timing_steps)
    names, wall, cpu, load = list(trainers), {n: [] for n in trainers}, {n: [] for n in trainers}, []
    loader = iter(trainers["full"]._loader(dataset, a.batch_size, True, TIMING_SEED))
    for step in range(a.timing_steps):
        t0 = time.perf_counter()
        batch = next(loader)
        load.append(time.perf_counter() - t0)
        for name in names[step % len(names):] + names[:step % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            trainers[name].training_step([batch])
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    # wall seconds are what the acceptance asks; the process's CPU seconds (all its threads) shake less when other
    # jobs take the cores (a step waiting for a core costs wall time, not CPU time)
    out = {f"{n}_s_per_step": statistics.median(t[1:]) for n, t in wall.items()}
    out.update({f"{n}_cpu_s_per_step": statistics.median(t[1:]) for n, t in cpu.items()})
    out["data_loading_s_per_step"] = statistics.median(load[1:])
    out["lora_speedup"] = out["full_s_per_step"] / out["lora_s_per_step"]
    out["lora_speedup_vs_frozen_vision"] = out["full_frozen_vision_s_per_step"] / out["lora_s_per_step"]
    out["lora_cpu_speedup"] = out["full_cpu_s_per_step"] / out["lora_cpu_s_per_step"]
    out["trainable_params"] = {n: sum(p.numel() for p in t.model.parameters() if p.requires_grad)
                               for n, t in trainers.items()}
    return out


# ----------------------------------------------------------------------------------------------- accuracy
def accuracies(model, processor, test_new: list[dict], test_old: list[dict]) -> tuple[dict, dict]:
    model.eval()
    return (new_kind_accuracy(test_new, answer_questions(model, processor, test_new)),
            accuracy_by_kind(test_old, answer_questions(model, processor, test_old)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2vl-demo", help="demo checkpoint (folder or 'qwen2vl-demo')")
    p.add_argument("--steps", type=int, default=250, help="LoRA optimizer steps (0: timing only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-r", type=int, default=16, help="rank (alpha = 2 r)")
    p.add_argument("--lora-target", nargs="+", default=None, metavar="NAME",
                   help="decoder projections to adapt (default: all seven, as qwen2vl train)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast in every set-up")
    p.add_argument("--new-share", type=float, default=0.5, help="share of new-kind examples in training")
    p.add_argument("--max-shapes", type=int, default=2, help="shapes per new-kind picture: 1..this")
    p.add_argument("--timing-steps", type=int, default=12, help="interleaved steps timed per set-up (0: none)")
    p.add_argument("--test-size", type=int, default=240, help="held-out examples of the old kinds")
    p.add_argument("--new-test-size", type=int, default=120, help="held-out examples of the new kind")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args(argv)
    if not 0.0 < a.new_share <= 1.0 or a.max_shapes < 1 or a.steps < 0 or a.timing_steps < 0:
        p.error("--new-share must be in (0, 1], --max-shapes >= 1, --steps and --timing-steps >= 0")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(a.model)
    n_train = max(a.steps, a.timing_steps) * a.batch_size
    train = Conversations(training_examples(n_train, a.new_share, TRAIN_SEED, a.max_shapes))
    result = {"model": a.model, "threads": torch.get_num_threads(), "batch_size": a.batch_size,
              "lora_r": a.lora_r, "lora_target": a.lora_target or "all", "bf16": a.bf16}
    if a.timing_steps > 1:
        result.update(time_steps(a.model, processor, train, a))
        print(json.dumps(result), flush=True)
    if a.steps == 0:
        print(summary(result))
        return 0

    rng = random.Random(NEW_TEST_SEED)
    test_new = [filled_example(rng, a.max_shapes) for _ in range(a.new_test_size)]
    test_old = held_out_set(a.test_size)
    model = Qwen2VLForConditionalGeneration.from_pretrained(a.model, dtype="float32")
    result["new_kind_before"], old_before = accuracies(model, processor, test_new, test_old)
    args = TrainingArguments(max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
                             warmup_ratio=0.05, logging_steps=25, progress=False, bf16=a.bf16, **lora_args(a))
    trainer = Trainer(model, processor, args, train)
    t0 = time.perf_counter()
    trainer.train()
    result["lora_train_s"] = time.perf_counter() - t0
    result["loss_curve"] = [(h["step"], round(h["loss"], 4)) for h in trainer.history if "loss" in h]
    tuned = trainer.model.merge_and_unload()
    result["new_kind_after"], old_after = accuracies(tuned, processor, test_new, test_old)
    result["old_kinds_before"], result["old_kinds_after"] = old_before, old_after
    result["old_retention"] = old_after["all"] / max(old_before["all"], 1e-9)
    print(json.dumps(result), flush=True)
    print(summary(result))
    return 0


def summary(r: dict) -> str:
    ok = lambda c: "PASS" if c else "FAIL"  # noqa: E731
    lines = []
    if "new_kind_after" in r:
        new, before, after = r["new_kind_after"]["all"], r["old_kinds_before"]["all"], r["old_kinds_after"]["all"]
        lines += [f"new kind '{NEW_KIND}': {r['new_kind_before']['all']:.1%} before -> {new:.1%} after LoRA "
                  f"[>= 90 %: {ok(new >= 0.9)}]",
                  f"old kinds: {before:.1%} before -> {after:.1%} after; absolute >= 95 %: {ok(after >= 0.95)}; "
                  f"retention {r['old_retention']:.1%} of the base model's [>= 95 %: {ok(r['old_retention'] >= 0.95)}]"]
    if "lora_speedup" in r:
        lines.append(f"s/step (wall, {r['threads']} threads): full {r['full_s_per_step']:.3f}, full with the vision "
                     f"tower frozen {r['full_frozen_vision_s_per_step']:.3f}, LoRA {r['lora_s_per_step']:.3f}: LoRA "
                     f"{r['lora_speedup']:.2f}x faster than full [>= 1.5x: {ok(r['lora_speedup'] >= 1.5)}], "
                     f"{r['lora_speedup_vs_frozen_vision']:.2f}x than full with frozen vision; CPU s/step: full "
                     f"{r['full_cpu_s_per_step']:.3f}, LoRA {r['lora_cpu_s_per_step']:.3f} "
                     f"({r['lora_cpu_speedup']:.2f}x); data loading {r['data_loading_s_per_step']:.3f} s/step apart")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
