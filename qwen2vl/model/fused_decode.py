"""The CPU decoding fast path: one kernel call runs a whole decoding step through the decoder stack
(the op layer's `decode_layers`), instead of ~7 Python-level module calls per layer. Same kernels, same order as the
per-op path, so the output is bit-identical to it (tests/test_fused_decode.py); it only applies where the per-op
path would itself run on those kernels, and anything else (autograd, hooks, tensor-parallel layers, eager / flash
attention, fp32, more than 8 rows, a CPU without AVX512-BF16) takes the per-op path. int4 / int8 layers
(quantize_model) are fused where each projection runs a kernel cpu_layer.c has (int4: the exact kernel or the
integer one; int8: the integer one), widths multiples of 128 and no act-order permutation: at 2-4x fewer bytes
per token the ~200 Python-level calls a step saves weigh more than for bf16.
"""
from __future__ import annotations

import weakref

import torch

from ..kernels.backend import KernelLinear
from ..kernels.build import has_avx512bf16
from ..kernels.cpu import linear_choice
from ..quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from .attention import attention_choice
from .cache import KVCache
from .pretrained import embedding_dtype_device

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
        # int4 / int8 projections: the format, and int8's scales as the fp32 the kernel reads (made once)
        types = {type(p) for p in self.projs}
        self.quantized = "int4" if types == {Int4WeightOnlyLinear} else "int8" if types == {Int8WeightOnlyLinear} \
            else None
        if self.quantized == "int4" and any(p.input_perm is not None for p in self.projs):
            self.quantized = "unfusable"  # GPTQ act-order: the activations are gathered first
        self.scales = [p.scales.float().contiguous() for p in self.projs] if self.quantized == "int8" else \
            [p.scales for p in self.projs] if self.quantized == "int4" else None

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
        when a projection is not the plain KernelLinear (tensor-parallel layers, a served LoRA adapter that a row
        of this step uses) nor a fusable quantized one, or a bias differs. Quantized layers give their packed
        4-bit / int8 weights in the projections' places."""
        if self.quantized == "unfusable":
            return None
        if self.quantized is None and any(type(p) is not KernelLinear and not getattr(p, "idle_lora", False)
                                          for p in self.projs):
            return None
        q, k, v, o, g, u, d = self.projs
        if q.bias is None or k.bias is None or v.bias is None or any(p.bias is not None for p in (o, g, u, d)):
            return None
        w = [p.weight if self.quantized is None else p.qweight if self.quantized == "int4" else p.weight_int8
             for p in self.projs]
        return [self.norms[0].weight, w[0], q.bias, w[1], k.bias, w[2], v.bias, w[3], self.norms[1].weight, w[4],
                w[5], w[6]]

    def kinds(self, rows: int) -> list[str] | None:
        """kernels.ops.DECODE_KINDS names of the projections for `rows` rows: the kernels `choose` picked for the per-op
        path, or None where one of them is not in cpu_layer.c (torch's int ops, int8's exact kernel)."""
        out = []
        for p in self.projs:
            route = p.choice(torch.empty(rows, p.in_features, dtype=torch.bfloat16))
            if route == "intdot":
                out.append(f"{self.quantized}_intdot")
            elif route in (None, "kernel") and self.quantized == "int4" and has_avx512bf16():
                out.append("int4")
            else:
                return None
        return out


_plans: "weakref.WeakKeyDictionary[torch.nn.ModuleList, list[_LayerPlan]]" = weakref.WeakKeyDictionary()


def _weights(layers) -> tuple[list[torch.Tensor], list[_LayerPlan]] | None:
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
    return weights, plans


def attn_shape(weights: list[torch.Tensor], attn) -> tuple[int, int, int]:
    """(heads, kv heads, head dim) from the layer's own q / k biases (Hq*D,), (Hkv*D,)."""
    d = attn.head_dim
    return weights[2].shape[0] // d, weights[4].shape[0] // d, d


def _kernels_chosen(weights: list[torch.Tensor], rows: int, attn) -> bool:
    """Whether `choose` runs every product of a layer (same shapes in every layer) and the attention of `rows`
    decoding rows on the kernels (or today's rule, which is the kernels), as this one call does."""
    if attention_choice("decode_attention", rows, *attn_shape(weights, attn)) not in (None, "kernel"):
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
    planned = _weights(layers)
    if planned is None:
        return None
    weights, plans = planned
    fmt, quant = plans[0].quantized, None
    if any(p.quantized != fmt for p in plans):
        return None
    if fmt is not None:  # every layer: the same format, shapes and group size
        q4 = fmt == "int4"
        group = plans[0].projs[0].group_size if q4 else 128
        if attention_choice("decode_attention", x.shape[0], *attn_shape(weights, layers[0].self_attn)) not in (
                None, "kernel") or (q4 and any(p.group_size != group for pl in plans for p in pl.projs)):
            return None
        kinds = plans[0].kinds(x.shape[0])  # same shapes in every layer: the same choices
        if kinds is None:
            return None
        quant = (kinds * len(plans), [s for p in plans for s in p.scales],
                 [p.zeros if q4 else None for pl in plans for p in pl.projs], group)
    elif not _kernels_chosen(weights, x.shape[0], layers[0].self_attn):
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
                               attn0.num_heads, layers[0].input_layernorm.variance_epsilon, attn0.scale, quant)
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
        attn, (dtype, device) = text.layers[0].self_attn, embedding_dtype_device(text.embed_tokens)
        if dtype is torch.bfloat16 and device.type == "cpu":
            attention_choice("decode_attention", rows, attn.num_heads, attn.num_kv_heads, attn.head_dim)
