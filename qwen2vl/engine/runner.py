"""Model calls of the engine: prefill one request into its own KV row, decode a batch of rows.

* `ModelWorker(model, max_num_seqs, max_model_len)` owns the model and the engine's `KVCache` and does all
  torch work: `prefill(token_ids, mm, row) -> logits (V,)`: input_ids (1, S) (+ pixel values, CPU tensors in
  `mm`: the vision tower runs once per request) on `cache.rows(row, row + 1)`, the returned rope_deltas stay
  in the cache row; `decode(tokens, n) -> logits (n, V)`: input_ids (n, 1) on the view `cache.rows(0, n)` (no
  attention_mask: each row's own length says which keys are valid, M-RoPE positions come from the row's real
  length + delta); `reset_rows(rows)` / `move_rows([(src, dst)])` (it is the KV pool's store).
* `TPWorker(tp_runner, ...)`: the same interface under tensor parallelism, on rank 0. It creates a
  `ModelWorker` on every rank (`tp_runner.create`) and sends each call to all of them (`tp_runner.call`), so
  every rank runs the same forwards on identical KV caches (each holding its share of the kv heads); results
  come from rank 0's worker. Arguments are token-id lists, row numbers and CPU vision tensors (cheap to send).
* `ModelRunner(worker, model)`: the engine's view (`prefill(request, row)`, `decode(tokens, n)`).
All calls come from the engine's single step thread.
"""
from __future__ import annotations

import torch

from ..model.cache import KVCache

WORKER_NAME = "qwen2vl-engine-worker"


class ModelWorker:
    """One per rank: the model + the KV cache its forwards write."""

    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.cache = KVCache.from_config(model.config.text_config, max_num_seqs, max_model_len, model.dtype,
                                         model.device)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], mm: dict, row: int) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        mm = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
              for k, v in mm.items() if v is not None}
        out = self.model(input_ids=ids, past_key_values=self.cache.rows(row, row + 1), use_cache=True,
                         logits_to_keep=1, **mm)
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int], n: int) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        out = self.model(input_ids=ids, past_key_values=self.cache.rows(0, n), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.inference_mode()
    def reset_rows(self, rows: list[int]) -> None:
        self.cache.reset_rows(rows)

    @torch.inference_mode()
    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.cache.move_row(src, dst)


class TPWorker:
    """Rank 0's handle on the `ModelWorker`s of all tensor-parallel ranks (see the module docstring)."""

    def __init__(self, tp_runner, max_num_seqs: int, max_model_len: int, name: str = WORKER_NAME):
        self.tp_runner, self.name = tp_runner, name
        self.local = tp_runner.create(name, ModelWorker, max_num_seqs, max_model_len)  # rank 0's own worker
        self.cache = self.local.cache

    def _call(self, method: str, *args):
        return self.tp_runner.call(self.name, method, *args)

    def prefill(self, token_ids: list[int], mm: dict, row: int) -> torch.Tensor:
        return self._call("prefill", list(token_ids), {k: v.cpu() for k, v in mm.items() if v is not None}, row)

    def decode(self, tokens: list[int], n: int) -> torch.Tensor:
        return self._call("decode", list(tokens), n)

    def reset_rows(self, rows: list[int]) -> None:
        self._call("reset_rows", list(rows))

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        self._call("move_rows", [tuple(m) for m in moves])


def make_worker(model, max_num_seqs: int, max_model_len: int, tp_runner=None):
    """A local `ModelWorker`, or a `TPWorker` when a tensor-parallel runner (`qwen2vl.parallel.TPRunner`) is given."""
    if tp_runner is None:
        return ModelWorker(model, max_num_seqs, max_model_len)
    return TPWorker(tp_runner, max_num_seqs, max_model_len)


class ModelRunner:
    def __init__(self, worker, model):
        self.worker = worker
        self.device = model.device
        self.dtype = model.dtype
        self.vocab = model.config.text_config.vocab_size

    def prefill(self, request, row: int) -> torch.Tensor:
        return self.worker.prefill(request.prompt_token_ids, request.mm.tensors(), row)

    def decode(self, tokens: list[int], n: int) -> torch.Tensor:
        return self.worker.decode(tokens, n)
