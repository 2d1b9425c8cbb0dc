"""Per-token log-probabilities (`SamplingParams(logprobs=k)`, k in 0..20).

Semantics follow vLLM's default (`logprobs_mode="raw_logprobs"`): log_softmax of the model's raw logits, before
repetition / presence / frequency penalties, temperature and top-k/top-p/min-p, so a sampled request reports the
same numbers as a greedy one for the same prefix. As in vLLM, a structured-output grammar mask is applied first
(forbidden tokens have probability 0 and the rest is renormalised). Each step records the sampled token's
log-probability and the k most likely tokens (descending); the sampled token may be outside the top k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # (token id, logprob) of the k most likely tokens, most likely first


def record(scores: torch.Tensor, seqs, tokens: list[int]) -> None:
    """scores (n, V) float32 (raw logits, grammar mask applied) → append one TokenLogprob to every sequence of
    `seqs` that asked for logprobs (`seq.logprobs` is a list then)."""
    rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
    if not rows:
        return
    idx = torch.tensor(rows, device=scores.device)
    lp = torch.log_softmax(scores.index_select(0, idx), dim=-1)
    k = max(seqs[i].request.params.logprobs for i in rows)
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=scores.device))[:, 0]
    chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        ki = seqs[i].request.params.logprobs
        seqs[i].logprobs.append(TokenLogprob(chosen[j], list(zip(top_ids[j][:ki], top_lp[j][:ki]))))
