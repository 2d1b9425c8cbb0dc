"""`Qwen2VLPreTrainedModel`: the transformers `PreTrainedModel` surface every public model class shares, so code
written for transformers and PEFT (which calls `enable_input_require_grads`, `get_input_embeddings`,
`gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`, `base_model`, `config.to_dict()`, ...) works
unchanged: weight init, IO, embeddings access and resizing, gradient checkpointing, parameter counts."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .attention import check_backend

logger = logging.getLogger(__name__)


def embedding_dtype_device(emb: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The activation dtype and device of an input embedding: nn.Embedding's weight, or a quantized embedding's
    own `dtype` / `device` (quantization/embedding.py: its table holds integer codes)."""
    weight = getattr(emb, "weight", None)
    return (weight.dtype, weight.device) if isinstance(weight, torch.Tensor) else (emb.dtype, emb.device)


class Qwen2VLPreTrainedModel(nn.Module):
    config_class = None              # set per class (imported lazily by `config_type`)
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _keys_to_ignore_on_save = None
    generation_config = None         # ForConditionalGeneration always sets one

    # ------------------------------------------------------------------------------------------ init
    def _init_weights(self, module: nn.Module) -> None:
        """As the reference: normal(0, initializer_range) linears/embeddings, zero biases, unit norms."""
        cfg = self.config
        std = getattr(getattr(cfg, "text_config", cfg), "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif hasattr(module, "variance_epsilon"):
            nn.init.ones_(module.weight)

    def init_weights(self) -> None:
        if any(p.is_meta for p in self.parameters()):
            return  # built for loading: real tensors come from the checkpoint
        with torch.no_grad():
            self.apply(self._init_weights)
        self.tie_weights()

    post_init = init_weights

    def tie_weights(self, *args, **kwargs) -> None:
        """Untied by default; the conditional-generation class ties lm_head to the embedding when configured."""

    # ------------------------------------------------------------------------------------------ basics
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    @classmethod
    def can_generate(cls) -> bool:
        return hasattr(cls, "generate")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counted once); `exclude_embeddings` leaves nn.Embedding weights out."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def set_attn_implementation(self, impl: str) -> None:
        """Switch every attention module (text and vision) to `impl` ("sdpa", "eager", "flash_attention_2")."""
        check_backend(impl)
        if hasattr(self.config, "attn_implementation"):
            self.config.attn_implementation = impl
        for m in self.modules():
            if hasattr(m, "attn_implementation") and isinstance(getattr(m, "attn_implementation"), str):
                m.attn_implementation = impl

    # ------------------------------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Module:
        base = self.base_model
        if base is not self:
            return base.get_input_embeddings()
        raise NotImplementedError(f"{type(self).__name__} has no input embeddings")

    def set_input_embeddings(self, value: nn.Module) -> None:
        base = self.base_model
        if base is self:
            raise NotImplementedError(f"{type(self).__name__} has no input embeddings")
        base.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return None

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the token embedding (and an untied LM head) to `new_num_tokens` rows (rounded up to
        `pad_to_multiple_of`); kept rows are unchanged, new rows start at the mean of the old ones
        (`mean_resizing`) or normal(0, initializer_range). Updates the config's vocab_size."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        if not isinstance(getattr(old, "weight", None), torch.Tensor):
            raise ValueError(f"cannot resize a quantized token embedding ({type(old).__name__}); resize the "
                             "full-precision model, then quantize it")
        n = old.num_embeddings if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if n < 1:
            raise ValueError(f"new_num_tokens must be >= 1, got {new_num_tokens!r}")
        new = nn.Embedding(n, old.embedding_dim, old.padding_idx if (old.padding_idx or 0) < n else None,
                           device=old.weight.device, dtype=old.weight.dtype)
        new.weight.data.copy_(_resized_rows(old.weight.data, n, mean_resizing, self))
        self.set_input_embeddings(new)
        head = self.get_output_embeddings()
        cfg = self.config
        text_cfg = getattr(cfg, "text_config", cfg)
        if head is not None and not getattr(cfg, "tie_word_embeddings", False):
            new_head = type(head)(head.in_features, n, bias=head.bias is not None, device=head.weight.device,
                                  dtype=head.weight.dtype)
            new_head.weight.data.copy_(_resized_rows(head.weight.data, n, mean_resizing, self))
            if head.bias is not None:
                new_head.bias.data.copy_(_resized_rows(head.bias.data[:, None], n, False, self, zero=True)[:, 0])
            self.set_output_embeddings(new_head)
        text_cfg.vocab_size = n
        self.tie_weights()
        return new

    # ------------------------------------------------------------------------------------------ training
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer / vision block in the backward pass. Checkpointing always runs
        non-reentrant (gradients are the same either way; it needs no input that requires grad), so
        `{"use_reentrant": ...}` is accepted; any other key is an error."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        unknown = set(kwargs) - {"use_reentrant", "preserve_rng_state", "determinism_check", "debug"}
        if unknown:
            raise ValueError(f"gradient_checkpointing_kwargs: unsupported keys {sorted(unknown)}")
        self.gradient_checkpointing_kwargs = kwargs
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)

    def _set_gradient_checkpointing(self, on: bool) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = on

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules() if m is not self)

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' outputs require grad (what PEFT calls with a frozen base model, so
        gradients reach adapters through checkpointed layers); the vision patch embedding likewise."""
        def hook(module, args, output):
            output.requires_grad_(True)

        self.disable_input_require_grads()
        targets = [m for m in self.modules() if isinstance(m, nn.Embedding) or type(m).__name__ == "PatchEmbed"]
        self._require_grads_hooks = [m.register_forward_hook(hook) for m in targets]

    def disable_input_require_grads(self) -> None:
        for h in getattr(self, "_require_grads_hooks", []):
            h.remove()
        self._require_grads_hooks = []

    # ------------------------------------------------------------------------------------------ IO
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # deliberate lazy import: loading/ builds and fills these classes (checkpoint, quantization, LoRA, TP)
        from ..loading import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, max_shard_size="5GB", **kwargs) -> None:
        from ..loading import save_pretrained  # deliberate: loading sits above model/ (see from_pretrained)

        save_pretrained(self, save_directory, max_shard_size=max_shard_size, **kwargs)


def _resized_rows(weight: torch.Tensor, n: int, mean_resizing: bool, model, zero: bool = False) -> torch.Tensor:
    """weight (V,H) → (n,H): the first min(V,n) rows kept, added rows from the old rows' mean (or init)."""
    v = weight.shape[0]
    if n <= v:
        return weight[:n]
    extra = weight.new_zeros(n - v, weight.shape[1])
    if not zero:
        if mean_resizing:
            extra += weight.float().mean(0).to(weight.dtype)
        else:
            cfg = model.config
            nn.init.normal_(extra, std=getattr(getattr(cfg, "text_config", cfg), "initializer_range", 0.02))
    return torch.cat([weight, extra], 0)
