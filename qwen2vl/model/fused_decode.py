"""The CPU decoding fast path: one kernel call runs a whole decoding step through the decoder stack
(the op layer's `decode_layers`), instead of ~7 Python-level module calls per layer. Same kernels, same order as the
per-op path, so the output is bit-identical to it (tests/test_fused_decode.py); it only applies where the per-op
path would itself run on those kernels, and anything else (autograd, hooks, int8 or tensor-parallel layers,
eager / flash attention, fp32, more than 8 rows, a CPU without AVX512-BF16) takes the per-op path. (int4 / int8
layers are not fused: at 2-4x fewer bytes per token the ~200 Python-level calls per step weigh more, but
cpu_layer.c would need a second weight format in every projection; not done yet.)
"""
from __future__ import annotations

import weakref

import torch

from ..kernels.backend import KernelLinear
from ..kernels.cpu import linear_choice
from ..quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from .attention import attention_choice
from .cache import KVCache

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _LayerPlan:
    """One decoder layer's modules, found once; `current()` sees a submodule replaced since (the layer is then
    planned again), `usable()` hooks or another attention backend, and `tensors()` re-reads its weights every step
    (the op checks them)."""

    def __init__(self, layer):
        self.layer, self.attn, self.mlp = layer, layer.self_attn, layer.mlp
        self.projs = [getattr(self.attn, n) for n in _PROJ[:4]] + [getattr(self.mlp, n) for n in _PROJ[4:]]
        self.norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.modules = list(layer.modules())
        self.children = self._children()

    def _children(self) -> tuple:
        return (*self.layer.children(), *self.attn.children(), *self.mlp.children())

    def current(self) -> bool:
        """Whether no submodule was replaced since the plan was made."""
        return self.children == self._children()

    def usable(self) -> bool:
        return self.attn.attn_implementation == "sdpa" and \
            not any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def tensors(self) -> list[torch.Tensor] | None:
        """The layer's tensors in `kernels.ops.DECODE_LAYER_WEIGHTS` order (checked by the kernel wrapper), or None
        when a projection is not the plain KernelLinear (int8 / tensor-parallel layers, a served LoRA adapter
        that a row of this step uses) or a bias differs."""
        if any(type(p) is not KernelLinear and not getattr(p, "idle_lora", False) for p in self.projs):
            return None
        q, k, v, o, g, u, d = self.projs
        if q.bias is None or k.bias is None or v.bias is None or any(p.bias is not None for p in (o, g, u, d)):
            return None
        return [self.norms[0].weight, q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight,
                self.norms[1].weight, g.weight, u.weight, d.weight]


_plans: "weakref.WeakKeyDictionary[torch.nn.ModuleList, list[_LayerPlan]]" = weakref.WeakKeyDictionary()


def _weights(layers) -> list[torch.Tensor] | None:
    plans = _plans.get(layers)
    if plans is None or len(plans) != len(layers):
        plans = _plans[layers] = [_LayerPlan(m) for m in layers]
    weights = []
    for i, m in enumerate(layers):
        if plans[i].layer is not m or not plans[i].current():  # a layer or a submodule was swapped: re-plan it
            plans[i] = _LayerPlan(m)
        plan = plans[i]
        w = plan.tensors() if plan.usable() else None
        if w is None:
            return None
        weights += w
    return weights


def _kernels_chosen(weights: list[torch.Tensor], rows: int, attn) -> bool:
    """Whether `choose` runs every product of a layer (same shapes in every layer) and the attention of `rows`
    decoding rows on the kernels (or today's rule, which is the kernels), as this one call does."""
    d = attn.head_dim  # q / k biases (Hq*D,), (Hkv*D,): the attention's shape from the layer's own weights
    if attention_choice("decode_attention", rows, weights[2].shape[0] // d, weights[4].shape[0] // d, d) \
            not in (None, "kernel"):
        return False
    return all(linear_choice(rows, weights[i], weights[i + 1] if i in (1, 3, 5) else None) in (None, "kernel")
               for i in (1, 3, 5, 7, 9, 10, 11))


def fused_decode_step(layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                      cache: KVCache | None) -> torch.Tensor | None:
    """x (B,1,H) bf16 → the last layer's output (B,1,H), with every layer's new key/value written to `cache`
    (whose lengths the caller advances as usual); None (nothing written) where the per-op path must run.
    cos/sin (B,1,D); mask (B,1,1,K) bool or None as `build_attention_mask` returns it."""
    if (cache is None or x.device.type != "cpu" or x.dtype is not torch.bfloat16 or x.dim() != 3
            or x.shape[1] != 1 or not 0 < x.shape[0] <= 8 or torch.is_grad_enabled() or not layers):
        return None
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    weights = _weights(layers)
    if weights is None or not _kernels_chosen(weights, x.shape[0], layers[0].self_attn):
        return None
    attn0 = layers[0].self_attn
    kv_len = max(cache.lengths) + 1
    cache.ensure_capacity(kv_len)  # what the per-op path's layer-0 cache.update does
    if mask is not None:
        if mask.shape != (x.shape[0], 1, 1, kv_len):
            return None
        mask = mask.reshape(x.shape[0], kv_len).to(torch.uint8)
    out = x.reshape(x.shape[0], x.shape[2]).clone()
    ok = attn0.ops.decode_layers(out, weights, cache.keys, cache.values, list(cache.lengths), kv_len, mask,
                               cos.reshape(cos.shape[0], -1).contiguous(), sin.reshape(sin.shape[0], -1).contiguous(),
                               attn0.num_heads, layers[0].input_layernorm.variance_epsilon, attn0.scale)
    return out.view_as(x) if ok else None



def choose_decoding_backends(model, rows: int = 1) -> None:
    """At load: `choose`'s decisions for decoding `rows` rows (each distinct projection shape, the LM head, the
    decode attention), so a bf16 CPU model's first generated tokens do not pay for the timing (within the chooser's
    budget; the vision and prefill shapes are decided at their first use)."""
    text = model.model.language_model
    if not text.layers:
        return
    seen = set()
    with torch.inference_mode():
        for mod in [*text.layers[0].modules(), model.lm_head]:
            w = mod.weight if type(mod) is KernelLinear else getattr(mod, "weight_int8", getattr(mod, "qweight", None))
            key = (type(mod), None if w is None else tuple(w.shape), getattr(mod, "bias", None) is not None)
            if w is None or w.device.type != "cpu" or key in seen:
                continue
            seen.add(key)
            if isinstance(mod, Int8WeightOnlyLinear):
                mod.choice(torch.zeros(rows, mod.in_features, dtype=mod.scales.dtype))
            elif isinstance(mod, Int4WeightOnlyLinear):
                mod.choice(torch.zeros(rows, mod.in_features, dtype=torch.bfloat16))
            elif w.dtype is torch.bfloat16:
                linear_choice(rows, w, mod.bias)
        attn, emb = text.layers[0].self_attn, text.embed_tokens.weight
        if emb.dtype is torch.bfloat16 and emb.device.type == "cpu":
            attention_choice("decode_attention", rows, attn.num_heads, attn.num_kv_heads, attn.head_dim)
