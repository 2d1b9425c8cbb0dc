"""Qwen2 decoder with M-RoPE: `Qwen2VLTextModel`.

Shapes: inputs (B,S) ids or (B,S,H) embeds; `position_ids (3,B,S)` (t,h,w rows; a (B,S) tensor means text-only);
`attention_mask (B,P+S)` 1 = real token; `past_key_values` a `KVCache` whose rows may hold different lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import Qwen2VLTextConfig
from ..kernels.backend import KernelLinear
from ..kernels.backend import current as current_ops
from .attention import VarlenBatch, attention_probs, text_attention, varlen_batch
from .cache import KVCache
from .fused_decode import fused_decode_step
from .outputs import ModelOutput
from .pretrained import Qwen2VLPreTrainedModel
from .introspection import output_flags, recording_attentions
from .packing import check_packed_allowed, packed_segments, packed_varlen, segment_mask, segments_from_cu_seq_lens
from .rope_index import text_positions_from_cache


class Qwen2VLRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.ops = current_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.variance_epsilon)


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3,B,S) → cos/sin (B,S,head_dim) in `dtype`.

    The head_dim/2 frequencies are split by `mrope_section` over the (t,h,w) axes; the second half of the head
    repeats the first (frequency j' = j mod head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float,
                                             device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq               # (3,B,S,D/2)
    axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long, device=position_ids.device)
                      for i, n in enumerate(mrope_section)])
    idx = axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
    f = freqs.gather(0, idx)[0]                                       # (B,S,D/2)
    f = torch.cat([f, f], dim=-1)
    return f.cos().to(dtype), f.sin().to(dtype)


class Qwen2VLAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = self.head_dim ** -0.5
        h = config.hidden_size
        self.q_proj = KernelLinear(h, self.num_heads * self.head_dim, bias=True)
        self.k_proj = KernelLinear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = KernelLinear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = KernelLinear(self.num_heads * self.head_dim, h, bias=False)
        self.attn_implementation = getattr(config, "attn_implementation", None) or "sdpa"
        self.recorded_attentions: list | None = None   # set by Qwen2VLTextModel.forward(output_attentions=True)
        self.ops = current_ops()

    def forward(self, x, cos, sin, mask, cache: KVCache | None, varlen: VarlenBatch | None = None):
        b, s, _ = x.shape
        d = self.head_dim
        q, k = self.ops.rope(self.q_proj(x), self.k_proj(x), cos, sin, d)    # (B,Hq,S,D), (B,Hkv,S,D)
        v = self.v_proj(x).view(b, s, -1, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.recorded_attentions is not None:  # output_attentions (eager only): this call's probabilities
            self.recorded_attentions.append(attention_probs(q, k, mask, self.scale))
        o = text_attention(self.attn_implementation, q, k, v, mask, self.scale, varlen=varlen, ops=self.ops)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = KernelLinear(h, i, bias=False)
        self.up_proj = KernelLinear(h, i, bias=False)
        self.down_proj = KernelLinear(i, h, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"Qwen2-VL text MLP uses silu, got hidden_act={config.hidden_act!r}")
        self.ops = current_ops()

    def forward(self, x):
        return self.down_proj(self.ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class Qwen2VLDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2VLAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2VLRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2VLRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, varlen=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, varlen)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None   # L+1 of (B,S,H): embeddings, each layer (last normed)
    attentions: tuple[torch.Tensor, ...] | None = None      # L of (B,Hq,S,K) probabilities (eager only)


def build_attention_mask(attention_mask: torch.Tensor | None, past: list[int], s: int, device,
                         segments: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Boolean mask (B,1,S,K) True = attend (or None for plain causal), plus key_valid (B,K) and
    query_valid (B,S). Query i of row b sits at slot past[b]+i; it sees valid keys at slots <= its own.
    `segments` (B,S) (packed rows, no past): keys only within the query's own sample."""
    b = len(past)
    kv_len = max(past) + s
    if attention_mask is not None and attention_mask.shape[-1] != kv_len:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds "
                         f"{max(past)} past + {s} new tokens = {kv_len}.")
    slots = torch.arange(kv_len, device=device)
    past_t = torch.tensor(past, device=device)[:, None]
    key_valid = slots[None, :] < past_t + s
    if attention_mask is not None:
        key_valid = key_valid & attention_mask.bool()
    query_valid = torch.ones(b, s, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask[:, -s:].bool()
    uniform = len(set(past)) <= 1
    if segments is None and uniform and (attention_mask is None or bool(key_valid.all())):
        return None, key_valid, query_valid  # no pads: no mask (and no sync)
    q_slot = past_t + torch.arange(s, device=device)[None, :]          # (B,S)
    mask = slots[None, None, :] <= q_slot[..., None]                    # causal (B,S,K)
    mask = mask & key_valid[:, None, :]
    if segments is not None:
        mask = mask & segment_mask(segments)[:, 0]
    # Pad queries would see no key at all (NaN rows); let every query see its own slot.
    mask = mask | (slots[None, None, :] == q_slot[..., None])
    return mask[:, None], key_valid, query_valid


def _packed_segments(position_ids, new_mask, kwargs, b, s, device) -> torch.Tensor | None:
    """Segment ids (B,S) of packed samples, from `cu_seq_lens[_q]` if given, else detected in position_ids."""
    cu = next((kwargs[k] for k in ("cu_seq_lens", "cu_seq_lens_q", "cu_seq_lens_k") if kwargs.get(k) is not None),
              None)
    if cu is not None:
        return segments_from_cu_seq_lens(cu, b, s, device)
    if s < 2:
        return None
    valid = torch.ones(b, s, dtype=torch.bool, device=device) if new_mask is None else new_mask.bool()
    return packed_segments(position_ids, valid)


class Qwen2VLTextModel(Qwen2VLPreTrainedModel):
    config_class = Qwen2VLTextConfig
    _no_split_modules = ["Qwen2VLDecoderLayer"]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Qwen2VLDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2VLRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def get_input_embeddings(self):
        return self.embed_tokens

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype, device, growable: bool = False) -> KVCache:
        """An empty KV cache for this decoder, holding as many kv heads as its attention modules project: all
        of them, or this rank's share once parallel.tp has sharded the model."""
        return KVCache.from_config(self.config, batch_size, max_length, dtype, device, growable,
                                   num_kv_heads=self.layers[0].self_attn.num_kv_heads)

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, s, _ = inputs_embeds.shape
        device = inputs_embeds.device
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is None and use_cache and not self.training:
            cache = self.new_cache(b, max(s, 1) * 2, inputs_embeds.dtype, device, growable=True)
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows but the input has batch size {b}")
        past = list(cache.lengths) if cache is not None else [0] * b
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D (batch, past+seq), got {tuple(attention_mask.shape)}")

        new_mask = attention_mask[:, -s:] if attention_mask is not None else None
        if position_ids is None:
            real = cache.real_lengths if cache is not None else [0] * b
            deltas = cache.rope_deltas if cache is not None else None
            position_ids, _ = text_positions_from_cache(real, deltas, s, new_mask, device)
        elif position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        elif position_ids.shape[0] == 4:  # transformers 5.x layout [text; t; h; w]
            position_ids = position_ids[1:]
        if position_ids.shape != (3, b, s):
            raise ValueError(f"position_ids must be (3, {b}, {s}), got {tuple(position_ids.shape)}")

        segments = _packed_segments(position_ids, new_mask, kwargs, b, s, device)
        check_packed_allowed(segments, cache, past)
        mask, key_valid, query_valid = build_attention_mask(attention_mask, past, s, device, segments)
        varlen = None
        if device.type == "cuda" and self.layers and \
                self.layers[0].self_attn.attn_implementation == "flash_attention_2":
            # Where the real tokens sit, once for all layers (no host sync per layer).
            varlen = packed_varlen(segments, query_valid) if segments is not None else \
                varlen_batch(key_valid, query_valid, all_valid=mask is None)
        cos, sin = mrope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta,
                                 self.config.mrope_section, inputs_embeds.dtype)
        x = inputs_embeds
        want_hidden, want_attn = output_flags(self, kwargs)
        hidden = [x] if want_hidden else None
        fused = fused_decode_step(self.layers, x, cos, sin, mask, cache) if s == 1 and not (
            want_hidden or want_attn) else None
        if fused is not None:  # CPU decoding: all layers in one kernel call (model/fused_decode.py)
            x = fused
        else:
            with recording_attentions(self.layers, want_attn) as attentions:
                for layer in self.layers:
                    if self.gradient_checkpointing and self.training and cache is None:
                        x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, varlen,
                                                              use_reentrant=False)
                    else:
                        x = layer(x, cos, sin, mask, cache, varlen)
                    if hidden is not None:
                        hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as the reference: the last entry is the normed output
        if cache is not None:
            added = [s] * b if new_mask is None else new_mask.sum(-1).tolist()
            cache.advance(s, added)
        out = BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache if use_cache else None,
                                      hidden_states=tuple(hidden) if hidden is not None else None,
                                      attentions=tuple(attentions) if want_attn else None)
        return out if kwargs.get("return_dict", True) is not False else out.to_tuple()
