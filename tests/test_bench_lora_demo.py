"""The LoRA demo bench's own parts (benchmarks/bench_lora_demo.py; the acceptance run itself is the bench): the new
question kind's gold answers agree with the scene and with the picture, its metric, the training mix, and LoRA
training on the demo model changes adapter weights only."""
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2vl import AutoProcessor, Qwen2VLForConditionalGeneration
from qwen2vl.demo import data
from qwen2vl.train import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_lora_demo as bench  # noqa: E402

RED, BLUE, WHITE = [220, 40, 40], [40, 80, 220], [255, 255, 255]


def _shape(kind, color, rgb, center, extent, outline):
    return {"shape": kind, "color": color, "rgb": rgb, "center": center, "extent": extent, "outline": outline,
            "angle": 0.0, "aspect": 1.0}


def _scene(*shapes):
    return {"size": [224, 160], "background": WHITE, "noise": 0.0, "noise_seed": 0, "aa": False,
            "shapes": list(shapes)}


def test_gold_answers_of_constructed_scenes():
    circle = _shape("circle", "red", RED, [50, 80], 60, 0)
    square = _shape("square", "blue", BLUE, [160, 80], 50, 6)
    two = _scene(circle, square)
    yes, no = "Yes, it is.", "No, it is not."
    assert bench.filled_answer(two, ["the circle", "filled"]) == yes
    assert bench.filled_answer(two, ["the circle", "outlined"]) == no
    assert bench.filled_answer(two, ["the square", "outlined"]) == yes
    assert bench.filled_answer(two, ["the square", "filled"]) == no
    assert bench.filled_answer(_scene(dict(square)), ["the shape", "filled"]) == no
    big = _scene(dict(circle, extent=90, outline=3), dict(circle, center=[180, 40], extent=30))
    assert bench.filled_answer(big, ["the biggest shape", "outlined"]) == yes
    with pytest.raises(KeyError):  # two circles: "the circle" names none of them
        bench.filled_answer(big, ["the circle", "filled"])


def _centre_rgb(img, s):
    x, y = (round(v) for v in s["center"])
    return np.asarray(img, dtype=np.float32)[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)


def test_generated_examples_match_their_pictures():
    """Each answer is what the scene says, and the picture shows it: the target's centre has its colour when
    filled, the background when outlined (pictures with noise and anti-aliasing included); filled / outlined and
    yes / no come with even odds."""
    rng = random.Random(0)
    exs = [bench.filled_example(rng, max_shapes=2) for _ in range(40)]
    for ex in exs:
        meta = ex["meta"]
        assert meta["kind"] == bench.NEW_KIND and ex["video"] is None and 1 <= len(meta["scene"]["shapes"]) <= 2
        assert ex["answer"] == bench.filled_answer(meta["scene"], meta["arg"])
        assert all(w in ex["question"] for w in meta["arg"])
        target = dict(bench.qs.targets("color", meta["scene"]))[meta["arg"][0]]
        want = target["rgb"] if target["outline"] == 0 else meta["scene"]["background"]
        assert np.abs(_centre_rgb(ex["image"], target) - want).max() < 40, ex["question"]
        assert np.asarray(ex["image"]).tolist() == np.asarray(data.render(meta)).tolist()  # meta redraws it
    undrawn = [bench.filled_example(rng, draw=False) for _ in range(400)]  # even odds of filled / yes
    targets = [dict(bench.qs.targets("color", e["meta"]["scene"]))[e["meta"]["arg"][0]] for e in undrawn]
    assert 0.42 < sum(t["outline"] == 0 for t in targets) / 400 < 0.58
    assert 0.42 < sum(e["answer"].startswith("Yes") for e in undrawn) / 400 < 0.58


def test_metric_needs_the_same_yes_or_no_and_nothing_else():
    assert bench.filled_correct("No, it is not.", "No, it is not.")
    assert bench.filled_correct("No, it isn't.", "No, it is not.")
    assert not bench.filled_correct("Yes, it is.", "No, it is not.")
    assert not bench.filled_correct("No, the circle is not outlined.", "No, it is not.")
    assert not bench.filled_correct("It is a circle.", "Yes, it is.")
    scene = _scene(_shape("circle", "red", RED, [50, 80], 60, 0))
    acc = bench.new_kind_accuracy([{"answer": "Yes, it is.", "meta": {"scene": scene}}] * 2, ["Yes, it is.", "No."])
    assert acc == {"all": 0.5, "1_shapes": 0.5}


def test_training_mix():
    exs = bench.training_examples(200, 0.5, seed=1)
    kinds = [e["meta"]["kind"] for e in exs]
    assert 70 <= kinds.count(bench.NEW_KIND) <= 130
    assert set(kinds) - {bench.NEW_KIND} <= set(data.QUESTION_KINDS)
    assert any(e["meta"]["clip"] for e in exs)  # clips of the old kinds too
    assert exs[0]["image"] is None  # drawn when read
    rec = bench.Conversations(exs)[0]
    assert rec["messages"][-1]["content"][0]["text"] == exs[0]["answer"]


def test_lora_training_on_the_demo_changes_adapters_only():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained("qwen2vl-demo")
    model = Qwen2VLForConditionalGeneration.from_pretrained("qwen2vl-demo", dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, progress=False,
                             lora_r=4, lora_alpha=8)
    trainer = Trainer(model, processor, args, bench.Conversations(bench.training_examples(4, 0.5, seed=2)))
    trainer.train()
    named = dict(trainer.model.named_parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in named.items())
    assert not any("visual" in n for n in named if "lora_" in n)  # decoder only: the vision tower is frozen
    assert any(p.abs().sum() > 0 for n, p in named.items() if "lora_B" in n)  # B starts at 0: adapters trained
    base = trainer.model.get_base_model().state_dict()
    for k, v in base.items():
        if "lora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k
