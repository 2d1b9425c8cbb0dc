"""Loading what an engine runs, in one place (the offline `LLM` and `qwen2vl serve` both use these): the model
(`load_model`), its processor (`load_processor`), tensor-parallel ranks (`start_tp`); and the end-of-sequence ids
an engine stops on (`default_eos_ids`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..model_files import resolve_name
from ..model import Qwen2VLForConditionalGeneration
from ..parallel import start_tensor_parallel
from ..processing.processor import Qwen2VLProcessor


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
    kw = {"dtype": dtype or "auto", "device_map": device}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if quantization:
        kw["quantization"] = quantization
    return Qwen2VLForConditionalGeneration.from_pretrained(model_or_path, **kw)


def load_processor(model_or_path):
    """The processor saved with a checkpoint (a path / hub id / 'qwen2vl-demo')."""
    return Qwen2VLProcessor.from_pretrained(resolve_name(model_or_path))


def start_tp(model, tp_size: int, *, dtype=None, device=None, attn_implementation=None, num_threads=None):
    """Start `tp_size` tensor-parallel ranks for the checkpoint `model` (a path / hub id / 'qwen2vl-demo');
    returns the `qwen2vl.parallel.TPGroup` (this process is rank 0)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError("tensor_parallel_size > 1 needs the model as a path / hub id (every rank loads its own "
                         "shards), not a loaded model instance.")
    kind = None if device is None else str(device).split(":")[0]
    if kind not in (None, "cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on the CPU (gloo) or CUDA (NCCL), not device={device!r}")
    if num_threads is None and (kind == "cpu" or (kind is None and not torch.cuda.is_available())):
        num_threads = max(1, torch.get_num_threads() // tp_size)   # the ranks share this machine's cores
    load = {"dtype": dtype or "auto"}
    if attn_implementation:
        load["attn_implementation"] = attn_implementation
    return start_tensor_parallel(model, tp_size, num_threads=num_threads,
                                 backend={"cpu": "gloo", "cuda": "nccl"}.get(kind), **load)
