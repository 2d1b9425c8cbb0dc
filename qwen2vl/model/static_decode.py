"""Static-shape decode step (`torch.compile` / CUDA graphs): `StaticDecoder`.

The eager decode step (`Qwen2VLForConditionalGeneration.decode_step` → `Qwen2VLTextModel`, whose CPU
decoding runs all layers in one kernel call where `fused_decode` applies) is dynamic: keys are sliced to
max(lengths)+1, masks and positions are rebuilt from host lists each step. `StaticDecoder` runs the same math
with every shape fixed and all per-row state on the device, so `torch.compile(mode="reduce-overhead")` can
capture the whole step as one CUDA graph and the host never waits for the device:

* `keys[l]`, `values[l]` (B, Hkv, Smax, D): the full preallocated K/V of layer l (model dtype);
* `lengths (B,)` long: filled slots per row (= the slot the next token is written to);
* `next_pos (B,)` long: text position of the next token (real tokens so far + rope delta; decode tokens have
  the same position on the t/h/w M-RoPE axes);
* `key_valid (B, Smax)` bool: slots a query may attend to (left pads of the prompt stay False).

`step(tokens (B,1)) -> logits (B,V) float32` embeds, computes cos/sin from `next_pos`, and per layer writes
the new k/v at `lengths` with `scatter_`, attends over all Smax slots with `key_valid` as the SDPA mask, then
final norm + LM head; finally `lengths`, `next_pos`, `key_valid` are advanced in place. No `.item()`,
`.tolist()` or `bool(tensor)`: the host keeps only its own int copy of the longest row (to refuse overflow).
GQA: for one query token all query heads of a kv group share keys and mask, so q (B,Hq,1,D) is regrouped to
(B,Hkv,Hq/Hkv,D) and attends to the un-repeated cache (same math as repeating K/V, without the copy).

The model's own modules are called (embedding, RMSNorms, q/k/v/o, MLP and LM-head linears, the rotary of the
op layer); only the cache write and the attention are written here. The op layer's kernels are `torch.library`
ops with fake implementations, so a compiled CPU graph keeps them without a break; on CUDA they are torch ops.

`get_static_decoder(model, ...)` (`model.static_decoding(...)`) keeps one decoder per model in
`model.static_decoder` (buffers reused, so a compiled graph is reused by later `generate` calls of the same batch
size and length bucket; `release_static_decoder` frees it);
`adopt(cache, attention_mask)` copies a prefilled `KVCache` into it (the prompt's slots only: `generate` then
sizes its prefill cache to the prompt, so K/V memory is not held twice).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache
from .pretrained import embedding_dtype_device

# torch.compile modes a static decoder accepts (generation's `compile=` option names one of them)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

LENGTH_BUCKET = 256  # get_static_decoder rounds Smax up to this, so nearby prompt lengths share one graph
_COMPILED: dict[str, object] = {}


def decode_forward(text, lm_head, inv_freq, tokens, keys, values, lengths, next_pos, key_valid):
    """One decode step with static shapes (compiled as is). text: `Qwen2VLTextModel`; tokens (B,1) long;
    keys/values: lists of (B,Hkv,Smax,D); lengths, next_pos (B,) long; key_valid (B,Smax) bool (all mutated in
    place). Returns logits (B,V) float32."""
    b = tokens.shape[0]
    x = text.embed_tokens(tokens.clamp(0, text.embed_tokens.num_embeddings - 1))    # (B,1,H)
    freqs = next_pos[:, None].float() * inv_freq                                         # (B,D/2)
    f = torch.cat([freqs, freqs], dim=-1)[:, None, :]                                    # (B,1,D)
    cos, sin = f.cos().to(x.dtype), f.sin().to(x.dtype)
    key_valid.scatter_(1, lengths[:, None], True)
    mask = key_valid[:, None, None, :]                                                   # (B,1,1,Smax)
    slot = lengths.view(b, 1, 1, 1)
    for i, layer in enumerate(text.layers):
        attn = layer.self_attn
        d = attn.head_dim
        h = layer.input_layernorm(x)
        q, k = attn.ops.rope(attn.q_proj(h), attn.k_proj(h), cos, sin, d)                # (B,Hq,1,D), (B,Hkv,1,D)
        v = attn.v_proj(h).view(b, 1, -1, d).transpose(1, 2)
        hkv = k.shape[1]
        idx = slot.expand(b, hkv, 1, d)
        keys[i].scatter_(2, idx, k)
        values[i].scatter_(2, idx, v)
        qg = q.reshape(b, hkv, -1, d)                  # query head g*rep + r → group g, row r (as repeat_kv)
        o = F.scaled_dot_product_attention(qg, keys[i], values[i], attn_mask=mask, scale=attn.scale)
        x = x + attn.o_proj(o.reshape(b, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = text.norm(x)
    logits = lm_head(x[:, -1]).float()
    lengths.add_(1)
    next_pos.add_(1)
    return logits


def _compile(fn, mode: str):
    """torch.compile with static shapes. The mode's inductor options plus `emulate_precision_casts`: fused
    kernels round to the model dtype where eager ops would, so bf16 results match the eager step."""
    from torch._inductor import list_mode_options

    return torch.compile(fn, options={**list_mode_options(mode), "emulate_precision_casts": True}, dynamic=False)


def _compiled(mode: str):
    # One compiled wrapper per mode for every decoder: dynamo's cache lives on the code object and guards on
    # shapes, so decoders of the same shapes share the compiled code.
    if mode not in _COMPILED:
        _COMPILED[mode] = _compile(decode_forward, mode)
    return _COMPILED[mode]


class StaticDecoder:
    """Static-shape decoding state + step for `model` (a `Qwen2VLForConditionalGeneration`); see the module
    docstring. `compile=False` runs the same static step eagerly (for tests and debugging)."""

    def __init__(self, model, batch_size: int, max_length: int, compile: bool = True,
                 mode: str = "reduce-overhead"):
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"StaticDecoder needs batch_size > 0 and max_length > 0, got {batch_size}, "
                             f"{max_length}")
        if compile and mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.model = model
        self.text = model.language_model
        cfg = self.text.config
        if getattr(model, "tp_world_size", 1) != 1:   # set by parallel.tp on the model it shards
            raise ValueError("StaticDecoder does not support tensor-parallel models; use the engine.")
        self.dtype, self.device = embedding_dtype_device(self.text.embed_tokens)
        self.batch_size, self.max_length = batch_size, max_length
        self.compile, self.mode = bool(compile), mode
        attn = self.text.layers[0].self_attn
        hkv, d = attn.k_proj.out_features // attn.head_dim, attn.head_dim
        shape = (batch_size, hkv, max_length, d)
        # Normal tensors even when built under inference_mode: a later call outside it must update them.
        with torch.inference_mode(False):
            self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.text.layers]
            self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.text.layers]
            self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self.device)
            # The same inverse frequencies (and float ops) as `text.mrope_cos_sin`, for identical cos/sin.
            self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float,
                                                                   device=self.device) / d))
        self._host_len = 0  # longest row, known on the host without reading the device
        if self.compile:
            # Fixed addresses: CUDA graphs may then mutate these buffers in place and replay across steps
            # (and across `adopt` calls) without copying them in.
            for t in [*self.keys, *self.values, self.lengths, self.next_pos, self.key_valid, self.inv_freq]:
                torch._dynamo.mark_static_address(t)
            self._fn = _compiled(mode)
        else:
            self._fn = decode_forward

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.compile and self.device.type == "cuda" and self.mode == "reduce-overhead"

    def matches(self, model, batch_size: int, max_length: int, compile: bool, mode: str) -> bool:
        dtype, device = embedding_dtype_device(model.language_model.embed_tokens)
        return (self.model is model and self.batch_size == batch_size and self.max_length == max_length
                and self.compile == bool(compile) and self.mode == mode and device == self.device
                and dtype == self.dtype)

    def adopt(self, cache: KVCache, attention_mask: torch.Tensor | None = None) -> None:
        """Load a prefilled cache: its filled K/V slots, lengths and M-RoPE state. `attention_mask (B, P)`
        (1 = real token) marks the cached slots that are real; slots past it count as real. Overwrites all
        previous state, so one decoder serves many `generate` calls."""
        b, lens = cache.batch_size, list(cache.lengths)
        if b != self.batch_size:
            raise ValueError(f"the cache holds {b} rows but this StaticDecoder was built for {self.batch_size}")
        if len(cache) != len(self.keys) or cache.keys[0].shape[1::2] != self.keys[0].shape[1::2]:
            raise ValueError(f"cache layout {len(cache)} x {tuple(cache.keys[0].shape)} does not match the "
                             f"model's {len(self.keys)} x {tuple(self.keys[0].shape)}")
        longest = max(lens)
        if longest >= self.max_length:
            raise ValueError(f"the cache holds {longest} tokens; this StaticDecoder has room for "
                             f"{self.max_length} (prompt + new tokens)")
        with torch.no_grad():
            for mine, theirs in zip([*self.keys, *self.values], [*cache.keys, *cache.values]):
                mine[:, :, :longest].copy_(theirs[:, :, :longest])
            lens_t = torch.tensor(lens, dtype=torch.long).to(self.device)
            valid = torch.arange(self.max_length, device=self.device)[None, :] < lens_t[:, None]
            if attention_mask is not None:
                m = attention_mask.to(self.device).bool()
                if m.dim() != 2 or m.shape[0] != b or m.shape[1] > self.max_length:
                    raise ValueError(f"attention_mask must be (batch={b}, <= {self.max_length}), "
                                     f"got {tuple(attention_mask.shape)}")
                valid[:, :m.shape[1]] &= m
            self.key_valid.copy_(valid)
            self.lengths.copy_(lens_t)
            pos = torch.tensor(cache.real_lengths, dtype=torch.long).to(self.device)
            if cache.rope_deltas is not None:
                pos = pos + cache.rope_deltas.reshape(-1).to(self.device, torch.long)
            self.next_pos.copy_(pos)
        self._host_len = longest

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,1) long on the model's device → next-token logits (B,V) float32."""
        if tokens.shape != (self.batch_size, 1):
            raise ValueError(f"tokens must be ({self.batch_size}, 1), got {tuple(tokens.shape)}")
        if self._host_len >= self.max_length:
            raise ValueError(f"StaticDecoder is full: all {self.max_length} slots are used")
        self._host_len += 1
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            logits = self._fn(self.text, self.model.lm_head, self.inv_freq, tokens.to(self.device), self.keys,
                              self.values, self.lengths, self.next_pos, self.key_valid)
        # A CUDA-graph output is overwritten by the next replay; callers may keep the logits (output_logits).
        return logits.clone() if self.uses_cuda_graphs else logits


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def get_static_decoder(model, batch_size: int, max_length: int, compile: bool = True,
                       mode: str = "reduce-overhead") -> StaticDecoder:
    """The model's StaticDecoder for this shape (Smax = max_length rounded up to LENGTH_BUCKET), reused
    across calls; one is kept per model (`model.static_decoder`; a different shape replaces it and frees the old
    buffers)."""
    smax = min(_bucket(max_length), max(max_length, model.config.text_config.max_position_embeddings))
    current = model.static_decoder
    if current is not None and current.matches(model, batch_size, smax, compile, mode):
        return current
    model.static_decoder = None  # free the old buffers before allocating new ones
    model.static_decoder = StaticDecoder(model, batch_size, smax, compile=compile, mode=mode)
    return model.static_decoder


def release_static_decoder(model) -> None:
    """Drop the model's StaticDecoder (its K/V buffers) until the next `generate(..., compile=...)`."""
    model.static_decoder = None
