"""Activation-aware per-input-channel scaling before group-wise 4-bit quantization (the scale search of AWQ,
Lin et al. 2023; our own implementation of the idea, no clipping search).

Rounding error hurts most on the input channels that carry large activations. For projections sharing an input x
(gate/up after post_attention_layernorm, down after act(gate) * up, o after the attention when every query
head has its own value head; not q/k/v, see `_sites`) we pick s (in,) = mean|x|^alpha (normalised), quantize
W * s instead of W, and fold 1/s into what produces x (the norm's weight, the up or v projection's rows), so the
float model is unchanged and the big channels get finer steps. alpha in [0, 1] is searched per site on
calibration activations, minimising |x Q(W s)^T / s - x W^T|^2 on a sample of output rows; alpha = 0 is plain
round-to-nearest, so on the calibration data the result is never worse than it.

Calibration: a few fixed texts run through the model itself (tokenized with the checkpoint's tokenizer where
there is one, else fixed pseudo-random token ids), CALIBRATION_TOKENS tokens in all.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..processing.tokenizer import AutoTokenizer
from .int4 import dequantize, quantize_rtn

log = logging.getLogger(__name__)

GRID = 10                  # alpha steps (0, 0.1, ..., 1)
SAMPLE_ROWS = 512          # output rows the loss is measured on (rows are quantized independently: exact for them)
CALIBRATION_TOKENS = 256   # calibration activations kept per site (a fixed sample of the tokens)
CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, in the city, the traffic lights changed from red "
    "to green and a crowd of people crossed the wide street on their way to work.",
    "Question: What is the capital of France? Answer: The capital of France is Paris, which is also its largest "
    "city. It lies on the Seine river in the north of the country.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe the picture: there "
    "are three shapes, a red circle, a blue square and a yellow triangle.<|im_end|>\n<|im_start|>assistant\n"
    "The image shows a red circle in the top left, a blue square in the middle and a yellow triangle.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface for about two "
    "and a half hours, collecting 21.5 kg of lunar material, while Michael Collins orbited above.",
    "Les modèles de langage prédisent le mot suivant. 大型语言模型可以理解图像和文本。 "
    "1 + 2 = 3, 7 * 8 = 56.",
)


def calibration_ids(model_dir=None, vocab_size: int = 0) -> list[torch.Tensor]:
    """The calibration prompts as token-id rows (1, T): the texts tokenized with model_dir's tokenizer, or (no
    tokenizer) fixed pseudo-random ids below vocab_size."""
    if model_dir is not None:
        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
            return [torch.tensor([tok.encode(t)]) for t in CALIBRATION_TEXTS]
        except Exception as exc:  # no tokenizer files: random ids still expose the weights' outlier channels
            log.info("int4 calibration: no tokenizer in %s (%s); pseudo-random token ids", model_dir, exc)
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, max(vocab_size, 1), (1, 64), generator=g) for _ in CALIBRATION_TEXTS]


def _sites(layer, kv_shared: bool):
    """(name, linears sharing an input, what produces that input: ("norm", module) | ("rows", Linear))."""
    a, m = layer.self_attn, layer.mlp
    # q/k/v (after input_layernorm) are left alone: their rounding error is amplified through the attention
    # softmax, which the per-linear loss does not see; scaling them made the demo model's next-token KL worse
    # (0.021 vs 0.015 at group 128) while mlp_in alone improved it (0.011).
    out = [("mlp_in", [m.gate_proj, m.up_proj], ("norm", layer.post_attention_layernorm)),
           ("down", [m.down_proj], ("rows", m.up_proj))]
    if not kv_shared:  # v's output channels are o's input channels one to one
        out.append(("o", [a.o_proj], ("rows", a.v_proj)))
    return out


@torch.no_grad()
def _collect(model, calibration, sites) -> dict[int, torch.Tensor]:
    """id(first linear of a site) -> its input activations (T, in) fp32 over all calibration prompts."""
    store: dict[int, list[torch.Tensor]] = {}
    hooks = []

    def keep(key):
        return lambda mod, args, out: store[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    for _, linears, _ in sites:
        key = id(linears[0])
        store[key] = []
        hooks.append(linears[0].register_forward_hook(keep(key)))
    try:
        text = model.language_model  # the decoder alone: calibration ids may hit image / video token ids
        for ids in calibration:
            text(input_ids=ids.to(text.embed_tokens.weight.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, parts in store.items():
        x = torch.cat(parts)
        if x.shape[0] > CALIBRATION_TOKENS:
            x = x[torch.randperm(x.shape[0], generator=g)[:CALIBRATION_TOKENS]]
        out[key] = x
    return out


def search_scale(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                 grid: int = GRID) -> tuple[torch.Tensor, float]:
    """The best per-input-channel scale s (in,) for x (T, in) and weight (out, in), and its alpha."""
    w = weight.detach().float()
    if w.shape[0] > SAMPLE_ROWS:
        w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:SAMPLE_ROWS]]
    ref = x @ w.T
    xm = x.abs().mean(0).clamp(min=1e-8)
    best = (float("inf"), torch.ones_like(xm), 0.0)
    for i in range(grid + 1):
        alpha = i / grid
        s = xm.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        q, sc, z = quantize_rtn(w * s, group_size)
        loss = float(((x @ (dequantize(q, sc, z, group_size) / s).T - ref) ** 2).mean())
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def apply_awq_scaling(model: nn.Module, group_size: int, calibration: list[torch.Tensor] | None = None) -> None:
    """Scale every decoder site's weights by its searched s and fold 1/s into the producer, in place (the float
    model computes the same function up to the model dtype's rounding)."""
    text = model.language_model
    cfg = text.config if hasattr(text, "config") else model.config.text_config
    if calibration is None:
        calibration = calibration_ids(None, cfg.vocab_size)
    kv_shared = cfg.num_key_value_heads != cfg.num_attention_heads
    sites = [site for layer in text.layers for site in _sites(layer, kv_shared)]
    acts = _collect(model, calibration, sites)
    alphas = []
    for _, linears, (kind, producer) in sites:
        weight = torch.cat([lin.weight for lin in linears])
        s, alpha = search_scale(acts.pop(id(linears[0])), weight, group_size)
        alphas.append(alpha)
        if alpha == 0.0:
            continue
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        if kind == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype)[:, None])
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
    log.info("int4 AWQ scaling: %d sites, alpha mean %.2f", len(alphas), sum(alphas) / max(len(alphas), 1))
