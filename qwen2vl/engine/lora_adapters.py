"""LoRA adapters served side by side on one base model (`qwen2vl serve --lora-modules name=DIR ...`).

Each decoder projection an adapter targets becomes a `MultiLoraLinear` (the same module, parameters and
state-dict keys; only its class changes): its output is the base projection's plus, for every batch row that
asks for an adapter, that adapter's delta `(x @ A_i.T) @ B_i.T * scale_i` (PEFT's unmerged LoRA). Rows of
different adapters and of the base model therefore run in one batch: the engine says which row uses which
adapter for each forward (`LoraAdapters.use(rows)`). With no adapter row in a step the CPU fused decode runs as
without adapters.

Adapter folders are standard PEFT LoRA folders (`adapter_config.json`, `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), made by `qwen2vl train --lora-*` or by PEFT on the transformers
model; they are read once, at start-up. Supported: LoRA on the decoder's linears (q/k/v/o, gate/up/down), with
`lora_alpha` / `use_rslora`; anything else (vision-tower targets, DoRA, biases, modules_to_save, per-module
rank / alpha patterns) is refused with a clear error: merge such an adapter with `--adapter` instead.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from ..kernels.backend import KernelLinear

_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_DECODER = re.compile(r"(^|\.)language_model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+$")


class MultiLoraLinear(KernelLinear):
    """A decoder `KernelLinear` with per-row LoRA deltas (see the module docstring). `lora`: {adapter index: (A (r, in),
    B (out, r), scale)}; `adapters`: the model's `LoraAdapters`, which holds the rows of the current forward."""

    lora: dict
    adapters: "LoraAdapters"

    @property
    def idle_lora(self) -> bool:
        """No row of the current forward uses an adapter (the fused CPU decode may run the plain weights)."""
        return not self.adapters.active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        rows = self.adapters.rows
        if not self.adapters.active:
            return y
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(rows):
            if a in self.lora:
                groups.setdefault(a, []).append(i)
        for a, idx in groups.items():
            lora_a, lora_b, scale = self.lora[a]
            if len(idx) == x.shape[0]:
                y = y + (x @ lora_a.T) @ lora_b.T * scale
            else:  # x (B, S, in): only these rows
                sel = torch.tensor(idx, device=x.device)
                y = y.index_add(0, sel, (x[sel] @ lora_a.T) @ lora_b.T * scale)
        return y


def read_adapter(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{module name: (A, B)} and the scale of the PEFT LoRA folder `path`; ValueError naming what is wrong."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if not weights.is_file():
        raise ValueError(f"{path} has no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} cannot be read: {e}") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{path} holds a {cfg.get('peft_type')} adapter; only LoRA adapters are supported")
    refused = {"use_dora": cfg.get("use_dora"), "modules_to_save": cfg.get("modules_to_save"),
               "rank_pattern": cfg.get("rank_pattern"), "alpha_pattern": cfg.get("alpha_pattern"),
               "fan_in_fan_out": cfg.get("fan_in_fan_out"), "bias": cfg.get("bias", "none") != "none"}
    bad = sorted(k for k, v in refused.items() if v)
    if bad:
        raise ValueError(f"{path}: LoRA options {bad} are not supported for per-request adapters (merge the "
                         "adapter into the model with --adapter instead)")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in adapter_model.safetensors")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        out[name] = (ab["A"], ab["B"])
    if not out:
        raise ValueError(f"{path}: adapter_model.safetensors holds no LoRA weights")
    return out, scale


class LoraAdapters:
    """The adapters installed on one model: `add(name, path) -> index`, `use(rows)` around a forward."""

    def __init__(self, model):
        self.model = model
        self.names: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self.rows: list[int] | None = None  # adapter index per batch row of the current forward (-1: base)
        self.active = False

    def add(self, name: str, path: str | Path) -> int:
        """Read the PEFT folder and install it under `name`; every check runs before the model is touched."""
        if not name or name in self.names:
            raise ValueError(f"LoRA adapter name {name!r} is empty or given twice")
        weights, scale = read_adapter(path)
        modules = dict(self.model.named_modules())
        index = len(self.names)
        plan = []
        for mod_name, (lora_a, lora_b) in weights.items():
            module = modules.get(mod_name)
            if module is None:
                raise ValueError(f"{path}: the adapter targets {mod_name}, which this model does not have")
            if not _DECODER.search(mod_name):
                raise ValueError(f"{path}: the adapter targets {mod_name}; per-request adapters cover the "
                                 "decoder's linears only (merge this one into the model with --adapter instead)")
            if not isinstance(module, KernelLinear):
                raise ValueError(f"{path}: {mod_name} is a {type(module).__name__}, not a plain linear layer: "
                                 "per-request adapters need an unquantized model")
            r = lora_a.shape[0]
            if lora_a.shape != (r, module.in_features) or lora_b.shape != (module.out_features, r):
                raise ValueError(f"{path}: {mod_name} LoRA shapes {tuple(lora_a.shape)} / {tuple(lora_b.shape)} "
                                 f"do not fit the layer ({module.out_features} x {module.in_features})")
            w = module.weight
            plan.append((module, lora_a.to(w.device, w.dtype), lora_b.to(w.device, w.dtype)))
        for module, lora_a, lora_b in plan:
            if not isinstance(module, MultiLoraLinear):
                module.__class__ = MultiLoraLinear  # same object and parameters: state dict and plans unchanged
                module.lora, module.adapters = {}, self
            module.lora[index] = (lora_a, lora_b, scale)
        self.names[name], self.paths[name] = index, str(path)
        return index

    def index(self, name: str | None) -> int:
        """-1 for the base model (None), else the adapter's index; KeyError for an unknown name."""
        return -1 if name is None else self.names[name]

    @contextmanager
    def use(self, rows: list[int] | None):
        """Run the forward inside with `rows[i]` the adapter of batch row i (-1: base)."""
        self.rows, self.active = rows, bool(rows) and any(a >= 0 for a in rows)
        try:
            yield
        finally:
            self.rows, self.active = None, False


def parse_lora_modules(values: list[str] | None) -> list[tuple[str, str]]:
    """vLLM's `--lora-modules` items: `name=path` or JSON `{"name": ..., "path": ...}` → [(name, path)]."""
    out = []
    for v in values or ():
        v = v.strip()
        if v.startswith("{"):
            try:
                d = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules {v!r}: bad JSON ({e})") from None
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("path"), str):
                raise ValueError(f"--lora-modules {v!r}: JSON needs string 'name' and 'path'")
            out.append((d["name"], d["path"]))
        else:
            name, sep, path = v.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {v!r}: expected name=path or a JSON object")
            out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules: a name is given twice ({names})")
    return out
