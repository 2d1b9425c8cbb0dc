"""Output containers: attribute, key (`out["logits"]`) and index (`out[0]`) access over the non-None fields,
like transformers' ModelOutput, so user code written for transformers keeps working."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())


class VisionFeatures(tuple):
    """Per-item merged vision embeddings `(n_i, H)`. A tuple (the transformers 4.x return type) that also has
    `.pooler_output` (the 5.x attribute) and `.last_hidden_state` (all items concatenated)."""

    @property
    def pooler_output(self) -> "VisionFeatures":
        return self

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return torch.cat(list(self), 0)


@dataclass
class Qwen2VLModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None   # L+1 of (B,S,H), the last one normed
    attentions: tuple[torch.Tensor, ...] | None = None      # L of (B,Hq,S,K), eager attention only
    rope_deltas: torch.Tensor | None = None


@dataclass
class Qwen2VLCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    rope_deltas: torch.Tensor | None = None
