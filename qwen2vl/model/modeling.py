"""`Qwen2VLModel` (vision tower + decoder) and `Qwen2VLForConditionalGeneration` (+ LM head, loss, IO)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.backend import KernelLinear
from ..configuration import Qwen2VLConfig
from ..vision_inputs import check_media
from .attention import check_backend
from .cache import KVCache
from .fused_decode import choose_decoding_backends
from .pretrained import Qwen2VLPreTrainedModel, embedding_dtype_device
from .outputs import Qwen2VLCausalLMOutputWithPast, Qwen2VLModelOutputWithPast, VisionFeatures
from .rope_index import get_rope_index
from .static_decode import StaticDecoder, get_static_decoder, release_static_decoder
from .text import Qwen2VLTextModel
from .vision import Qwen2VisionTransformerPretrainedModel

# Arguments transformers-style callers pass that carry no information for us.
_IGNORED_KWARGS = {"cache_position", "return_dict", "output_attentions", "output_hidden_states",
                   "num_items_in_batch", "second_per_grid_ts", "max_length_q", "max_length_k"}
# Packed-sequence boundaries (FlashAttention-style cumulative lengths), handed on to the decoder.
PACKING_KWARGS = ("cu_seq_lens", "cu_seq_lens_q", "cu_seq_lens_k")


def _check_kwargs(kwargs: dict) -> None:
    unknown = set(kwargs) - _IGNORED_KWARGS - set(PACKING_KWARGS)
    if unknown:
        raise TypeError(f"Unexpected forward arguments: {sorted(unknown)}")


class Qwen2VLModel(Qwen2VLPreTrainedModel):
    config_class = Qwen2VLConfig

    def __init__(self, config):
        super().__init__()
        self.config = config
        impl = config.attn_implementation or "sdpa"
        check_backend(impl)
        self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config, impl)
        self.language_model = Qwen2VLTextModel(config.text_config)
        self.language_model.set_attn_implementation(impl)
        self.init_weights()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    # ------------------------------------------------------------------------------------------ vision
    def _vision(self, pixel_values, grid_thw) -> VisionFeatures:
        feats = self.visual(pixel_values.to(self.visual.dtype), grid_thw)
        sizes = (grid_thw.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
        return VisionFeatures(torch.split(feats, sizes, dim=0))

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        """pixel_values (N, C*T*p*p), image_grid_thw (n,3) → per-image embeddings, each (t*h*w/m², H)."""
        return self._vision(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> VisionFeatures:
        return self._vision(pixel_values_videos, video_grid_thw)

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        """(3,B,S) M-RoPE positions and per-sequence rope_deltas (B,1); see `rope_index.get_rope_index`."""
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              image_token_id=self.config.image_token_id, video_token_id=self.config.video_token_id,
                              spatial_merge_size=self.config.vision_config.spatial_merge_size)

    def _placeholder_mask(self, input_ids, inputs_embeds, token_id):
        if input_ids is not None:
            return input_ids == token_id
        ref = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == ref).all(-1)

    def _scatter(self, inputs_embeds, mask, feats, name):
        n_tokens = int(mask.sum())
        n_feats = 0 if feats is None else feats.shape[0]
        if n_tokens != n_feats or (feats is not None and feats.shape[-1] != inputs_embeds.shape[-1]):
            raise ValueError(f"{name} features and {name.lower()} tokens do not match, "
                             f"tokens: {n_tokens}, features: {n_feats}")
        if n_tokens == 0:
            return inputs_embeds
        return inputs_embeds.masked_scatter(mask[..., None], feats.to(inputs_embeds.device, inputs_embeds.dtype))

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, rope_deltas=None, mm_token_type_ids=None,
                image_embeds=None, video_embeds=None, **kwargs) -> Qwen2VLModelOutputWithPast:
        """input_ids (B,S) | inputs_embeds (B,S,H); attention_mask (B,P+S); position_ids (3,B,S) optional;
        past_key_values KVCache; pixel_values (N,C*T*p*p) + image_grid_thw (n,3) (videos likewise);
        image_embeds/video_embeds: precomputed merged features (n_tokens, H) instead of pixels."""
        _check_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        # Pixels are checked against their grids here, under their own names; precomputed image_embeds /
        # video_embeds come with grids but no pixels (generate's one vision route), so only given pixels are.
        merge, width = self.visual.spatial_merge_size, self.visual.patch_embed.proj.in_features
        if pixel_values is not None:
            check_media("image", pixel_values, image_grid_thw, merge, width)
        if pixel_values_videos is not None:
            check_media("video", pixel_values_videos, video_grid_thw, merge, width)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        b, s = inputs_embeds.shape[:2]

        if pixel_values is not None:
            image_embeds = torch.cat(list(self.get_image_features(pixel_values, image_grid_thw)), 0)
        if pixel_values_videos is not None:
            video_embeds = torch.cat(list(self.get_video_features(pixel_values_videos, video_grid_thw)), 0)
        # Placeholders without features are an error in a prompt; a placeholder id *generated* during decoding
        # (cache already filled, no media given) is embedded like any other token.
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        img_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id)
        vid_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.video_token_id)
        if image_embeds is not None or (fresh and bool(img_mask.any())):
            inputs_embeds = self._scatter(inputs_embeds, img_mask, image_embeds, "Image")
        if video_embeds is not None or (fresh and bool(vid_mask.any())):
            inputs_embeds = self._scatter(inputs_embeds, vid_mask, video_embeds, "Video")

        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is None and use_cache and not self.training:
            cache = self.language_model.new_cache(b, max(2 * s, 16), inputs_embeds.dtype, inputs_embeds.device,
                                                  growable=True)
        if position_ids is None:
            position_ids, rope_deltas = self._positions(input_ids, attention_mask, image_grid_thw,
                                                        video_grid_thw, cache, rope_deltas, b, s,
                                                        inputs_embeds.device)
        if cache is not None and rope_deltas is not None:
            cache.rope_deltas = rope_deltas

        passed = {k: kwargs[k] for k in (*PACKING_KWARGS, "output_hidden_states", "output_attentions")
                  if kwargs.get(k) is not None}
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=use_cache, **passed)
        result = Qwen2VLModelOutputWithPast(last_hidden_state=out.last_hidden_state,
                                            past_key_values=out.past_key_values, hidden_states=out.hidden_states,
                                            attentions=out.attentions, rope_deltas=rope_deltas)
        return result if kwargs.get("return_dict", True) is not False else result.to_tuple()

    def _positions(self, input_ids, attention_mask, image_grid_thw, video_grid_thw, cache, rope_deltas, b, s,
                   device):
        """Positions of the S new tokens and the updated per-sequence deltas.

        New tokens are laid out by `get_rope_index` as if they started a sequence, then shifted by each row's
        next text position (#real tokens so far + delta); the new delta adds the chunk's own delta. A fresh
        cache (or none) has base 0 and delta 0, so prefill and decode are one rule."""
        new_mask = attention_mask[:, -s:] if attention_mask is not None else None
        fresh = cache is None or cache.get_seq_length() == 0
        if rope_deltas is None and not fresh:
            rope_deltas = cache.rope_deltas
        if input_ids is not None:
            pos, chunk_deltas = self.get_rope_index(input_ids, image_grid_thw, video_grid_thw, new_mask)
        else:
            if image_grid_thw is not None or video_grid_thw is not None:
                raise ValueError("M-RoPE positions for vision inputs need input_ids (or pass position_ids).")
            ones = torch.ones(b, s, dtype=torch.long, device=device)
            pos, chunk_deltas = get_rope_index(ones, None, None, new_mask, image_token_id=-1, video_token_id=-1,
                                               spatial_merge_size=1)
        if fresh:
            return pos, chunk_deltas
        old = rope_deltas if rope_deltas is not None else torch.zeros(b, 1, dtype=torch.long, device=device)
        base = torch.tensor(cache.real_lengths, dtype=torch.long, device=device)[:, None] + old.to(device)
        pos = pos + base[None]
        if new_mask is not None:
            pos = pos.masked_fill(~new_mask.bool()[None], 0)
        return pos, old.to(device) + chunk_deltas


class Qwen2VLForConditionalGeneration(Qwen2VLPreTrainedModel):
    config_class = Qwen2VLConfig
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Qwen2VLModel(config)
        self.lm_head = KernelLinear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if not self.lm_head.weight.is_meta:
            with torch.no_grad():
                self._init_weights(self.lm_head)
        self.tie_weights()
        self.static_decoder: StaticDecoder | None = None  # the compiled decoding state (`static_decoding`)
        # deliberate lazy import: generation/ drives the model (its cache, outputs, placeholders) and sits above it
        from ..generation.config import GenerationConfig

        self.generation_config = GenerationConfig.from_model_config(config)

    def tie_weights(self, *args, **kwargs) -> None:
        if self.config.tie_word_embeddings:
            emb = self.model.language_model.embed_tokens
            table = getattr(emb, "table", None)  # a quantized embedding (quantization/embedding.py): the head
            if table is not None:                # is its table module itself
                self.lm_head = table
            else:
                self.lm_head.weight = emb.weight

    @property
    def visual(self):
        return self.model.visual

    @property
    def language_model(self):
        return self.model.language_model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values, image_grid_thw):
        return self.model.get_image_features(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos, video_grid_thw):
        return self.model.get_video_features(pixel_values_videos, video_grid_thw)

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        return self.model.get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, rope_deltas=None, labels=None, logits_to_keep=0,
                mm_token_type_ids=None, image_embeds=None, video_embeds=None, **kwargs
                ) -> Qwen2VLCausalLMOutputWithPast:
        """Same inputs as `Qwen2VLModel.forward` plus `labels (B,S)` (-100 = ignored) and `logits_to_keep`
        (0 = all positions, k = last k, or a tensor of indices). Loss: shifted causal LM cross-entropy in fp32."""
        num_items = kwargs.get("num_items_in_batch")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                         image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, rope_deltas=rope_deltas,
                         image_embeds=image_embeds, video_embeds=video_embeds,
                         **{k: v for k, v in kwargs.items() if k != "return_dict"})
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items)
        result = Qwen2VLCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                               hidden_states=out.hidden_states, attentions=out.attentions,
                                               rope_deltas=out.rope_deltas)
        return result if kwargs.get("return_dict", True) is not False else result.to_tuple()

    # ------------------------------------------------------------------------------------------ decoding
    def new_cache(self, batch_size: int, max_length: int, growable: bool = False) -> KVCache:
        """An empty KV cache for `batch_size` rows of `max_length` tokens in the model's dtype and device, with the
        decoder's own kv-head count (this rank's share under tensor parallelism)."""
        dtype, device = embedding_dtype_device(self.get_input_embeddings())
        return self.language_model.new_cache(batch_size, max_length, dtype, device, growable)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
                    **flags) -> tuple[torch.Tensor, object]:
        """One decoding step: tokens (B,1) -> next-token logits (B,V) float32 and the decoder's output (hidden
        states / attentions when `flags` ask for them). Positions come from the cache (real lengths + rope
        deltas); the text decoder is called directly (a generated token may be a placeholder id, which the
        multimodal forward would try to match with vision features). On a bf16 CPU model the decoder runs all
        layers in one kernel call where it applies (fused_decode.py), else layer by layer: same bits. The
        static-shape (compiled) backend of the same step is `static_decoding`."""
        out = self.language_model(input_ids=tokens, attention_mask=attention_mask, past_key_values=cache,
                                  use_cache=True, **flags)
        return self.lm_head(out.last_hidden_state[:, -1]).float(), out

    def static_decoding(self, batch_size: int, max_length: int, compile: bool = True,
                        mode: str = "reduce-overhead") -> StaticDecoder:
        """The model's static-shape decoder (static_decode.py: `adopt(cache, mask)` then `step(tokens)`), kept in
        `self.static_decoder` and reused while the batch size and length bucket stay the same."""
        return get_static_decoder(self, batch_size, max_length, compile=compile, mode=mode)

    def release_static_decoder(self) -> None:
        release_static_decoder(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # CPU backends for decoding measured (or read) now, not at the first token
        choose_decoding_backends(loaded[0] if isinstance(loaded, tuple) else loaded)  # (model, info) on request
        return loaded

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs) -> dict:
        """The forward kwargs of one generation step (PEFT wraps this; our `generate` keeps its own state)."""
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                **kwargs}

    def generate(self, *args, **kwargs):
        from ..generation import generate  # deliberate: generation/ sits above model/ (see __init__)

        return generate(self, *args, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Token t predicts label t+1; computed in fp32; -100 ignored; mean over counted tokens (or sum/num_items)."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:2])}; "
                         "use logits_to_keep=0 when passing labels.")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is not None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum") / num_items_in_batch
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
