"""LoRA through PEFT (optional extra: `pip install qwen2vl[lora]`): the configs `qwen2vl train --lora-*` uses,
and loading a PEFT adapter folder (made here or by PEFT on the transformers model: module names are the same, so
`adapter_model.safetensors` keys are too) for inference.

Target modules, as regular expressions over module names (PEFT full-matches a string target):
* text (default): the decoder's q/k/v/o and gate/up/down projections;
* `vision=True` adds the ViT blocks' qkv / proj / fc1 / fc2 and the merger's two linears.
The patch embedding is never a target (a Conv3d in the reference, a Linear here: their LoRA shapes differ).
"""
from __future__ import annotations

import os
import re

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2")
MERGER_TARGETS = ("mlp.0", "mlp.2")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: pip install 'qwen2vl[lora]' (or pip install peft)") from None
    return peft


def target_modules(text: tuple[str, ...] | list[str] | None = None, vision: bool = False) -> str:
    """The PEFT `target_modules` regex for these text projection names (default: all seven) and, with
    `vision`, the vision tower's linears and merger."""
    names = list(text) if text else list(TEXT_TARGETS)
    unknown = set(names) - set(TEXT_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA text target(s) {sorted(unknown)}; choose from {list(TEXT_TARGETS)}")
    parts = [rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"]
    if vision:
        parts.append(rf".*visual\.blocks\.\d+\.(attn|mlp)\.({'|'.join(VISION_TARGETS)})")
        parts.append(rf".*visual\.merger\.({'|'.join(re.escape(m) for m in MERGER_TARGETS)})")
    return "|".join(f"({p})" for p in parts)


def lora_config(r: int = 16, alpha: float = 32, dropout: float = 0.0, targets=None, vision: bool = False):
    """A `peft.LoraConfig` for causal-LM fine-tuning of a Qwen2-VL model."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    return _peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                              target_modules=target_modules(targets, vision))


def apply_lora(model, config=None, **kwargs):
    """`peft.get_peft_model(model, config or lora_config(**kwargs))`: only the LoRA weights train."""
    return _peft().get_peft_model(model, config if config is not None else lora_config(**kwargs))


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def load_adapter(model, adapter_dir: str | os.PathLike, merge: bool = True, adapter_name: str = "default"):
    """Apply the PEFT adapter saved in `adapter_dir` to `model`. `merge=True` (what `from_pretrained(...,
    adapter=DIR)` does) folds it into the weights and returns the plain model, so inference runs at full speed
    on every kernel; `merge=False` returns the `PeftModel` (switch / unload adapters; `merge_and_unload()`)."""
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    peft = _peft()
    cfg = peft.PeftConfig.from_pretrained(adapter_dir)
    if getattr(cfg, "peft_type", None) not in ("LORA", peft.PeftType.LORA):
        raise ValueError(f"{adapter_dir} holds a {cfg.peft_type} adapter; only LoRA adapters are supported")
    wrapped = peft.PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=False)
    return wrapped.merge_and_unload() if merge else wrapped
