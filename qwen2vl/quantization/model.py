"""`quantize_model`: replace the text decoder's linears by weight-only quantized ones, in place."""
from __future__ import annotations

import torch
import torch.nn as nn

from .awq import apply_awq_scaling
from .embedding import QuantizedEmbedding, check_format, quantized_linear, vision_layer, vision_linears
from .int4 import Int4WeightOnlyLinear
from .int8 import Int8WeightOnlyLinear

SUPPORTED = ("int8", "int4")
INT4_METHODS = ("awq", "rtn")  # activation-aware scaling (default) or plain round-to-nearest


def text_model(model: nn.Module) -> nn.Module:
    return model.language_model  # Qwen2VLModel's decoder, or Qwen2VLForConditionalGeneration's (a property)


def decoder_linears(model: nn.Module):
    """(parent module, attribute name, Linear) of every decoder projection (q/k/v/o, gate/up/down)."""
    for layer in text_model(model).layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child


LM_HEAD_FORMATS = (False, True, "int8", "int4")


def quantize_model(model: nn.Module, method: str = "int8", include_lm_head: bool | str | None = None, *,
                   group_size: int = 128, int4_method: str = "awq", calibration: torch.Tensor | None = None,
                   embedding: bool | str | None = None, vision: bool | str = False) -> nn.Module:
    """Replace the decoder's Linear layers (q/k/v/o, gate/up/down), and the LM head when `include_lm_head`, by
    weight-only quantized ones, in place. A tied LM head gets its own quantized copy, unless `embedding` quantizes
    the table it shares; the vision tower stays untouched unless `vision`.

    `include_lm_head`: False (full precision), True (the same format as the decoder), "int8" or "int4". Default:
    the decoder's format for int8; "int8" for int4 — the head is ~20 % of a 2B model's decode bytes, 4 bits there
    costs the most quality per byte saved, and 8 bits per channel is nearly exact (llama.cpp's Q4_0 files keep the
    output matrix at 6 bits for the same reason).

    int4: group-wise (`group_size` input columns per scale / zero point), asymmetric. `int4_method` "awq" first
    rescales each projection's input channels by activation statistics from `calibration` (token ids (B, T);
    None: `awq.default_calibration`) and folds the inverse into the preceding norm / projection (see awq.py);
    "rtn" is plain round-to-nearest.

    int4 only (embedding.py; quality and sizes in the README's quantization section): `embedding` "int8" | "int4"
    stores the token embedding quantized (rows dequantized as looked up); a tied LM head then is that same table,
    so `include_lm_head` must be left out or name the same format. Default (None): "int8" where the head is tied
    and int8 (int4's default head: the table is then stored once, the head unchanged, only the lookup is new: KL
    +0.0002 on the demo model), else False. `vision` "int8" | "int4" (default False) quantizes the vision tower's
    linears."""
    if method not in SUPPORTED:
        raise ValueError(f"quantization={method!r} is not supported; choose one of {SUPPORTED}")
    if method == "int4" and int4_method not in INT4_METHODS:
        raise ValueError(f"int4_method={int4_method!r} is not one of {INT4_METHODS}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("quantize_model needs a loaded model (parameters are on the meta device).")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization})")
    text = text_model(model)
    head = getattr(model, "lm_head", None)
    is_tied = isinstance(head, nn.Linear) and head.weight is text.embed_tokens.weight
    explicit_head = include_lm_head is not None
    if include_lm_head is None:
        include_lm_head = True if method == "int8" else "int8"
    if include_lm_head not in LM_HEAD_FORMATS:
        raise ValueError(f"include_lm_head={include_lm_head!r} is not one of {LM_HEAD_FORMATS}")
    head_format = method if include_lm_head is True else include_lm_head
    if embedding is None:
        embedding = "int8" if method == "int4" and is_tied and head_format == "int8" else False
    check_format("embedding", embedding)
    check_format("vision", vision)
    if method != "int4" and (embedding or vision):
        raise ValueError("embedding= and vision= quantization go with quantization='int4' (int8 quantizes the "
                         "decoder and LM head only)")
    tied = bool(embedding) and is_tied
    if tied and explicit_head and head_format != embedding:
        raise ValueError(f"the LM head is tied to the input embedding, so embedding={embedding!r} quantizes it too: "
                         f"include_lm_head={include_lm_head!r} cannot differ (leave it out, or untie the head)")
    head_format = embedding if tied else head_format
    with torch.no_grad():
        if method == "int4" and int4_method == "awq":
            apply_awq_scaling(model, group_size, calibration)
        converters = {"int8": Int8WeightOnlyLinear.from_linear,
                      "int4": lambda lin: Int4WeightOnlyLinear.from_linear(lin, group_size)}
        for parent, name, child in decoder_linears(model):
            setattr(parent, name, converters[method](child))
        if embedding:
            text.embed_tokens = QuantizedEmbedding.from_embedding(text.embed_tokens, embedding, group_size)
        if tied:
            model.lm_head = text.embed_tokens.table  # one table: the lookup's rows are the head's output rows
        elif head_format and isinstance(head, nn.Linear):
            model.lm_head = converters[head_format](head)
        for parent, name, child in (list(vision_linears(model)) if vision else ()):
            setattr(parent, name, vision_layer(quantized_linear(vision, child.weight, child.bias, group_size)))
    model.quantization = method
    model.quantization_config = None if method == "int8" else {
        "quant_method": "qwen2vl_int4", "bits": 4, "group_size": group_size, "zero_point": True, "sym": False,
        "method": int4_method, "lm_head": head_format or False, "embedding": embedding, "vision": vision,
        "modules_to_not_convert": [] if vision else ["visual"]}
    return model
