"""Model calls of the engine: prefill one request into its own KV row, decode a batch of rows.

All torch work of the engine happens here, on the engine's single step thread.
* `prefill(request, row) -> logits (V,)`: input_ids (1, S) (+ pixel values: the vision tower runs once per
  request) on `cache.rows(row, row + 1)`; the returned rope_deltas stay in the cache row.
* `decode(tokens, n) -> logits (n, V)`: input_ids (n, 1) on the view `cache.rows(0, n)`. No attention_mask:
  each row's own length says which keys are valid, and M-RoPE positions come from the row's real length + delta.
"""
from __future__ import annotations

import torch

from .kv_pool import KVPool


class ModelRunner:
    def __init__(self, model, pool: KVPool):
        self.model = model
        self.pool = pool
        self.device = model.device
        self.dtype = model.dtype
        self.vocab = model.config.text_config.vocab_size

    @torch.inference_mode()
    def prefill(self, request, row: int) -> torch.Tensor:
        ids = torch.tensor([request.prompt_token_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=self.pool.view(row, row + 1), use_cache=True,
                         logits_to_keep=1, **request.mm.as_kwargs(self.device, self.dtype))
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int], n: int) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        out = self.model(input_ids=ids, past_key_values=self.pool.view(0, n), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]
