"""What an engine needs from a model besides the model itself: its end-of-sequence ids, and loading it by name."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def default_eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []

    def add(v):
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))

    gen = getattr(model, "generation_config", None)  # set by from_pretrained (generation_config.json)
    if gen is not None:
        add(getattr(gen, "eos_token_id", None))
    else:
        path = getattr(model, "name_or_path", None)
        if path:
            from ..loading import resolve_name

            file = Path(resolve_name(path)) / "generation_config.json"
            if file.is_file():
                add(json.loads(file.read_text(encoding="utf-8")).get("eos_token_id"))
    add(getattr(model.config.text_config, "eos_token_id", None))
    if tokenizer is not None and getattr(tokenizer, "eos_token", None):
        add(tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
    return ids


def load_model(model_or_path, dtype=None, device=None, attn_implementation=None, quantization=None):
    """A model instance is used as is; a path / hub id / 'qwen2vl-demo' is loaded with from_pretrained
    (`quantization`: "int8" | "int4" weight-only, quantized at load)."""
    if isinstance(model_or_path, torch.nn.Module):
        if quantization is not None and getattr(model_or_path, "quantization", None) != quantization:
            raise ValueError("quantization= applies to a model loaded from a path; quantize a model instance with "
                             "qwen2vl.quantization.quantize_model")
        return model_or_path
    from ..model import Qwen2VLForConditionalGeneration

    kw = {"dtype": dtype or "auto", "device_map": device}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if quantization:
        kw["quantization"] = quantization
    return Qwen2VLForConditionalGeneration.from_pretrained(model_or_path, **kw)
