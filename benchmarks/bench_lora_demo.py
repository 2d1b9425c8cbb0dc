"""LoRA fine-tuning of the bundled demo model on a question kind it was never trained on (issue #20 acceptance):
"Where is the {color} {shape}?" → "The {color} {shape} is in the {quadrant}.", mixed with the old kinds so they
are kept. Reports held-out exact-answer accuracy on the new kind and on the old ones, and seconds per optimizer
step of LoRA vs full fine-tuning (same batches).

    python benchmarks/bench_lora_demo.py [--steps 200] [--batch-size 8] [--lr 1e-3] [--lora-r 16]

Not a test: CPU-heavy (minutes), timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from qwen2vl import AutoProcessor, Qwen2VLForConditionalGeneration
from qwen2vl.demo import data
from qwen2vl.demo.train_demo import accuracy_by_kind, answer_questions
from qwen2vl.loading import demo_model_path
from qwen2vl.train import Trainer, TrainingArguments

OLD_KINDS = [k for k in data.QUESTION_KINDS if k != "text_only"]


def where_is(rng: random.Random) -> dict:
    """A picture with shapes and the new question about one of its (unique) coloured shapes."""
    while True:
        ex = data.make_example(rng, kinds=["exists"])
        shapes = ex["meta"]["shapes"]
        unique = [s for s in shapes if sum(t["shape"] == s["shape"] and t["color"] == s["color"]
                                           for t in shapes) == 1]
        if unique:
            s = rng.choice(unique)
            q = f"Where is the {s['color']} {s['shape']}?"
            a = f"The {s['color']} {s['shape']} is in the {s['quadrant']}."
            return {"image": ex["image"], "question": q, "answer": a, "meta": {**ex["meta"], "kind": "where_is"}}


def examples(n_new: int, n_old: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = [where_is(rng) for _ in range(n_new)] + data.make_dataset(n_old, seed + 1, kinds=OLD_KINDS)
    random.Random(seed + 2).shuffle(out)
    return out


def records(exs: list[dict]) -> list[dict]:
    return [{"messages": data.to_messages(e["question"], e["answer"], e["image"])} for e in exs]


def seconds_per_step(history: list[dict]) -> float:
    t = [h["elapsed_s"] for h in history if "elapsed_s" in h]
    return (t[-1] - t[0]) / max(1, len(t) - 1)  # from the first step's end: warm-up excluded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--timing-steps", type=int, default=8, help="steps of each kind timed for the speed ratio "
                   "(<= 1: no timing)")
    p.add_argument("--test-size", type=int, default=120, help="held-out examples per group (new / old)")
    p.add_argument("--lora-vision", action="store_true", help="also adapt the vision tower and merger")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(demo_model_path())
    train = records(examples(a.steps * a.batch_size * 6 // 10, a.steps * a.batch_size * 4 // 10, seed=11))
    result = {}
    for name, extra in (("full", {}), ("lora", {"lora_r": a.lora_r, "lora_alpha": 2.0 * a.lora_r}))[
            :2 if a.timing_steps > 1 else 0]:
        model = Qwen2VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype="float32")
        args = TrainingArguments(max_steps=a.timing_steps, per_device_train_batch_size=a.batch_size,
                                 learning_rate=1e-5, logging_steps=1, progress=False, **extra)
        trainer = Trainer(model, processor, args, train)
        trainer.train()
        result[f"{name}_s_per_step"] = seconds_per_step(trainer.history)
    if result:
        result["lora_speedup"] = result["full_s_per_step"] / result["lora_s_per_step"]
        print(json.dumps(result), flush=True)

    model = Qwen2VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype="float32")
    args = TrainingArguments(max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
                             warmup_ratio=0.05, logging_steps=25, progress=False, lora_r=a.lora_r,
                             lora_alpha=2.0 * a.lora_r, lora_vision=a.lora_vision)
    trainer = Trainer(model, processor, args, train)
    trainer.train()
    tuned = trainer.model.merge_and_unload().eval()
    rng = random.Random(99)
    test_new = [where_is(rng) for _ in range(a.test_size)]
    test_old = data.make_dataset(a.test_size, 98, kinds=OLD_KINDS)
    result["new_kind_accuracy"] = accuracy_by_kind(test_new, answer_questions(tuned, processor, test_new))["all"]
    old = accuracy_by_kind(test_old, answer_questions(tuned, processor, test_old))
    result["old_kinds_accuracy"] = old["all"]
    result["old_kinds_by_kind"] = old
    result["final_train_loss"] = trainer.history[-1].get("loss")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
