"""LoRA with PEFT: targets, `qwen2vl train --lora-*` (with gradient checkpointing) saving a standard PEFT adapter
folder, loading adapters for inference (from_pretrained(adapter=), merge_and_unload, CLI --adapter), adapters
crossing to transformers+PEFT and back with equal logits, and a user's PEFT script run unchanged but the import."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2vl.lora import apply_lora, load_adapter, target_modules
from qwen2vl.model import Qwen2VLForConditionalGeneration
from test_model_parity import _inputs
from test_train import model_dir  # noqa: F401  (the tiny model + demo tokenizer fixture)
from tiny import oracle_from, tiny_model

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4


def _lora_names(model):
    return [n for n, _ in model.named_modules() if n.endswith(".lora_A")]


def test_targets_text_only_or_with_vision_tower():
    text = apply_lora(tiny_model(), r=2, alpha=4)
    assert len(_lora_names(text)) == 2 * 7 and not any("visual" in n for n in _lora_names(text))
    assert all(("lora_" in n) == p.requires_grad for n, p in text.named_parameters())
    both = apply_lora(tiny_model(), r=2, alpha=4, targets=["q_proj", "v_proj"], vision=True)
    names = _lora_names(both)
    assert sum("language_model" in n for n in names) == 2 * 2
    assert sum("visual.blocks" in n for n in names) == 2 * 4 and sum("visual.merger" in n for n in names) == 2
    with pytest.raises(ValueError, match="unknown LoRA text target"):
        target_modules(["qkv_proj"])


def _train_steps(model, ids, kw, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids, **kw).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _logits(model, ids, kw, hf=False):
    with torch.no_grad():
        extra = {"mm_token_type_ids": (ids == 4).long()} if hf else {"use_cache": False}
        return model(input_ids=ids, **kw, **extra).logits


def test_adapter_crosses_to_transformers_peft_and_back(tmp_path):
    """Adapters on text and vision linears, trained a few steps on each side, give equal logits on the other."""
    ids, kw = _inputs([("image", [1, 4, 4])], 2)
    base = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    base.save_pretrained(tmp_path / "base")
    targets = target_modules(vision=True)

    ours = apply_lora(tiny_model(merge_size=2, mrope_section=(4, 2, 2)), r=4, alpha=8, vision=True)
    _train_steps(ours, ids, kw)
    ours.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(oracle_from(base), tmp_path / "ours")
    assert (_logits(ours, ids, kw) - _logits(hf, ids, kw, hf=True)).abs().max() <= ATOL

    hf = peft.get_peft_model(oracle_from(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                task_type="CAUSAL_LM"))
    _train_steps(hf, ids, {**kw, "mm_token_type_ids": (ids == 4).long()})
    hf.save_pretrained(tmp_path / "hf")
    merged = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base", adapter=tmp_path / "hf")
    ref = _logits(hf, ids, kw, hf=True)
    assert (_logits(merged, ids, kw) - ref).abs().max() <= ATOL
    assert (_logits(base, ids, kw) - ref).abs().max() > 1e-2  # the adapter did change the model
    unmerged = load_adapter(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "hf",
                            merge=False)
    assert (_logits(unmerged, ids, kw) - ref).abs().max() <= ATOL
    assert type(unmerged.merge_and_unload()) is Qwen2VLForConditionalGeneration


def test_train_command_saves_a_peft_adapter(tmp_path, model_dir):
    from qwen2vl import cli
    from qwen2vl.demo import data
    from qwen2vl.train import main

    path = data.write_jsonl(str(tmp_path / "train.jsonl"), 4, seed=9)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", path, "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--lora-r", "4", "--lora-alpha", "8",
                 "--lora-vision", "--gradient-checkpointing"]) == 0
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    pattern = re.compile(r"base_model\.model\.model\.(language_model\.layers|visual\.blocks|visual\.merger)\..*"
                         r"\.lora_[AB]\.weight")
    assert keys and all(pattern.fullmatch(k) for k in keys), keys[:4]
    assert any("visual.blocks" in k for k in keys)
    base = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    tuned = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, adapter=out)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert (_logits(base, ids, {}) - _logits(tuned, ids, {})).abs().max() > 1e-4
    assert cli.main(["run", "--model", str(model_dir), "--adapter", str(out), "--max-new-tokens", "2",
                     "Hello"]) == 0
    assert cli.main(["run", "--model", str(model_dir), "--adapter", str(tmp_path), "Hello"]) != 0


def test_users_peft_script_runs_with_only_the_import_changed(tmp_path):
    """~10 s CPU (up to ~20 s wall on a loaded machine): a fresh interpreter importing torch + peft is the point —
    the script must run as its user runs it."""
    script = (ROOT / "tests" / "user_scripts" / "peft_lora_finetune.py").read_text()
    line = "from transformers import AutoProcessor, Qwen2VLForConditionalGeneration"
    assert script.count(line) == 1
    (tmp_path / "script.py").write_text(script.replace(line, line.replace("transformers", "qwen2vl")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(ROOT / "qwen2vl" / "demo" / "model"),
                           str(tmp_path / "adapter")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"loss ([\d.]+)", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "answer:" in proc.stdout and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
