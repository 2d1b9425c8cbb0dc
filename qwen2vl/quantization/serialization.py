"""Saving and loading quantized models: the `quantization_config` that `save_pretrained` writes into config.json
and that `from_pretrained` reads back to build the quantized layers before the weights are read (so an int4
checkpoint loads as int4, with no float copy of its weights at any point).

Our own int4 format ("quant_method": "qwen2vl_int4"), per quantized projection `<name>`:
    <name>.qweight     uint8 (out, ceil(in / 128) * 64)   the kernel layout of `int4.pack_nibbles`
    <name>.scales      float32 (out, n_groups)
    <name>.zeros       uint8 (out, n_groups)              integer zero points 0..15
    <name>.input_perm  int64 (in,)                        only for act-order layers (GPTQ desc_act)
    <name>.bias        model dtype (out,)                 only where the projection has a bias
config.json: {"quant_method": "qwen2vl_int4", "bits": 4, "group_size": 128, "zero_point": true, "sym": false,
"method": "awq" | "rtn", "lm_head": "int8", "embedding": false, "vision": false, "modules_to_not_convert":
["visual"]}; "lm_head" is false (a full-precision head: `lm_head.weight`), "int8" (`lm_head.weight_int8` int8
(out, in) + `lm_head.scales` (out,), one scale per output row) or "int4"/true (the int4 tensors above).
"embedding" "int8" / "int4" (embedding.py): `model.embed_tokens.table.*` holds the table in those layouts (vocab,
hidden); a tied LM head is that table (no `lm_head.*` tensors; "lm_head" names the same format). "vision" "int8" /
"int4": the vision tower's linears `visual.blocks.*.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2}`, `visual.merger.mlp.{0,2}`
in those layouts ("modules_to_not_convert" then empty). Absent keys mean false (checkpoints saved before them).

`LOADERS` maps a quant_method to the function preparing a meta-device model for its checkpoint; the hub formats
(AWQ / GPTQ) register theirs there. Anything else gets a ValueError naming quant_method / version / bits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from ..checkpoint import checkpoint_files, checkpoint_to_model_key, model_kind

from .int4 import Int4WeightOnlyLinear
from .int8 import Int8WeightOnlyLinear
from .embedding import FORMATS, QuantizedEmbedding, empty_quantized_linear, vision_layer, vision_linears
from .model import LM_HEAD_FORMATS, decoder_linears, text_model

OWN_INT4 = "qwen2vl_int4"


def _checkpoint_keys(model: nn.Module, model_dir) -> set[str]:
    """Model-side names of the tensors in the checkpoint (headers only)."""
    kind, keys = model_kind(model), set()
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            keys.update(checkpoint_to_model_key(k, kind) for k in sf.keys())
    return keys


def _prepare_own_int4(model: nn.Module, qcfg: dict, model_dir, dtype: torch.dtype) -> None:
    bits, group_size = qcfg.get("bits"), qcfg.get("group_size")
    if bits != 4 or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"quantization_config {OWN_INT4}: bits={bits!r}, group_size={group_size!r} not supported "
                         "(bits 4 with a positive group_size)")
    keys = _checkpoint_keys(model, model_dir) if model_dir is not None else set()  # None: shapes only
    names = {id(m): n for n, m in model.named_modules()}

    def meta_layer(parent: nn.Module, attr: str, lin: nn.Linear) -> Int4WeightOnlyLinear:
        prefix = f"{names[id(parent)]}.{attr}." if names[id(parent)] else f"{attr}."
        return Int4WeightOnlyLinear(lin.in_features, lin.out_features, group_size, lin.bias is not None,
                                    dtype, "meta", act_order=prefix + "input_perm" in keys)

    for parent, attr, lin in decoder_linears(model):
        setattr(parent, attr, meta_layer(parent, attr, lin))
    head, lm_head = qcfg.get("lm_head"), getattr(model, "lm_head", None)
    if head is not None and head not in LM_HEAD_FORMATS:
        raise ValueError(f"quantization_config {OWN_INT4}: lm_head={head!r} not supported (false, 'int8', 'int4')")
    embedding, vision = qcfg.get("embedding", False), qcfg.get("vision", False)
    for option, fmt in (("embedding", embedding), ("vision", vision)):
        if fmt not in FORMATS:
            raise ValueError(f"quantization_config {OWN_INT4}: {option}={fmt!r} not supported (false, 'int8', 'int4')")
    for parent, attr, lin in (list(vision_linears(model)) if vision else ()):
        setattr(parent, attr, vision_layer(empty_quantized_linear(
            vision, lin.in_features, lin.out_features, lin.bias is not None, group_size, dtype)))
    if embedding:
        text = text_model(model)
        emb = text.embed_tokens
        text.embed_tokens = QuantizedEmbedding(empty_quantized_linear(
            embedding, emb.embedding_dim, emb.num_embeddings, False, group_size, dtype), emb.padding_idx)
        if isinstance(lm_head, nn.Linear) and lm_head.weight is emb.weight:  # tied: the head is the table
            if head != embedding:
                raise ValueError(f"quantization_config {OWN_INT4}: a tied LM head is the embedding table, but "
                                 f"lm_head={head!r} and embedding={embedding!r} differ")
            model.lm_head = text.embed_tokens.table
            return
    if head == "int8" and isinstance(lm_head, nn.Linear):
        model.lm_head = Int8WeightOnlyLinear(lm_head.in_features, lm_head.out_features, lm_head.bias is not None,
                                             dtype, "meta")
    elif head and isinstance(lm_head, nn.Linear):
        model.lm_head = meta_layer(model, "lm_head", lm_head)


LOADERS: dict[str, Callable[[nn.Module, dict, Path, torch.dtype], None]] = {OWN_INT4: _prepare_own_int4}


def prepare_quantized(model: nn.Module, qcfg: dict, model_dir, dtype: torch.dtype) -> None:
    """Replace `model`'s (meta-device) layers by the quantized ones `qcfg` describes, before loading weights."""
    if not isinstance(qcfg, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(qcfg).__name__}")
    method = qcfg.get("quant_method")
    loader = LOADERS.get(method)
    if loader is None:
        raise ValueError(f"unsupported quantized checkpoint: quant_method={method!r}, "
                         f"version={qcfg.get('version')!r}, bits={qcfg.get('bits')!r}; loadable: "
                         f"{', '.join(sorted(LOADERS))}")
    loader(model, qcfg, None if model_dir is None else Path(model_dir), dtype)
    model.quantization = "int4" if qcfg.get("bits") == 4 else str(method)
    model.quantization_config = dict(qcfg)


def config_for_save(model: nn.Module) -> dict | None:
    """The quantization_config to write with `model`, None for an unquantized one; ValueError where saving the
    quantized model is not supported (int8: quantize again at load instead)."""
    method = getattr(model, "quantization", None)
    if not method:
        return None
    qcfg = getattr(model, "quantization_config", None)
    if qcfg is None or qcfg.get("quant_method") != OWN_INT4:
        raise ValueError(f"Saving a {method}-quantized model is not supported; save the full-precision model and "
                         f"pass quantization={method!r} to from_pretrained instead.")
    return qcfg
