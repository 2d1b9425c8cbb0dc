"""Per-row sampling for a batch of sequences with different `SamplingParams`.

`sample(logits (n, V), seqs) -> list[int]` (`process` gives the scores it draws from), built on the processors
of `qwen2vl.generation.logits` (transformers order: repetition penalty → min-tokens EOS ban → temperature →
top-k → top-p → min-p). OpenAI presence / frequency penalties are applied with the repetition penalty. Rows
with equal warper settings are filtered together; each sampled row then draws with its sequence's own
`torch.Generator`, so a seeded request samples the same tokens whatever else is in the batch. Greedy rows
(temperature 0) take the argmax.
"""
from __future__ import annotations

import torch

from .. import guided_decoding as guided
from . import logprobs
from ..generation.logits import NEG_INF, apply_repetition_penalty, sample_from_scores, warp


def _needs_penalties(seq) -> bool:
    p = seq.request.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or len(seq.output_ids) < p.min_tokens)


def _apply_penalties(scores: torch.Tensor, i: int, seq) -> None:
    """In place on row i of scores (n, V) float32."""
    p = seq.request.params
    vocab = scores.shape[-1]
    dev = scores.device
    row = scores[i:i + 1]
    if p.repetition_penalty != 1.0:
        ids = torch.tensor(seq.request.prompt_token_ids + seq.output_ids, device=dev).clamp_max(vocab - 1)
        seen = torch.zeros(1, vocab, dtype=torch.bool, device=dev)
        seen[0, ids] = True
        row = apply_repetition_penalty(row, seen, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=dev), minlength=vocab)[:vocab]
        row = row - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float())[None]
    if len(seq.output_ids) < p.min_tokens:
        banned = [t for t in list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(seq.request.eos_ids))
                  if t < vocab]
        if banned:
            row = row.index_fill(-1, torch.tensor(banned, device=dev), NEG_INF)
    scores[i:i + 1] = row


def mask(logits: torch.Tensor, seqs) -> torch.Tensor:
    """logits (n, V) → float32 scores with each constrained row's grammar mask applied (guided_decoding.py)."""
    scores = logits.float()
    guides = [s.guide for s in seqs]
    if any(g is not None for g in guides):  # grammar masks first: penalties and warpers then only see allowed tokens
        scores = guided.mask_logits(scores, guides)
    return scores


def process(logits: torch.Tensor, seqs) -> tuple[torch.Tensor, list[list[int]]]:
    """logits (n, V) for the n sequences `seqs` (same order) → (scores (n, V) float32, sampled row groups).

    Greedy rows get the grammar mask and the penalties only (their token is the argmax); sampled rows also the
    warpers of their params. Each group lists the rows that share warper settings (they are filtered together)."""
    return _process(mask(logits, seqs), seqs)


def _process(scores: torch.Tensor, seqs) -> tuple[torch.Tensor, list[list[int]]]:
    penalised = [i for i, s in enumerate(seqs) if _needs_penalties(s)]
    if penalised:
        scores = scores.clone()
        for i in penalised:
            _apply_penalties(scores, i, seqs[i])
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        p = s.request.params
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
    if groups:
        scores = scores.clone() if not penalised else scores
        for rows in groups.values():
            idx = torch.tensor(rows, device=scores.device)
            scores[idx] = warp(scores.index_select(0, idx), seqs[rows[0]].request.params)
    return scores, list(groups.values())


def sample(logits: torch.Tensor, seqs) -> list[int]:
    """logits (n, V) for the n sequences `seqs` (same order) → next token id per sequence."""
    masked = mask(logits, seqs)
    scores, groups = _process(masked, seqs)
    out = scores.argmax(-1)
    for rows in groups:
        for i in rows:
            out[i] = sample_from_scores(scores[i:i + 1], seqs[i].generator)[0]
    tokens = out.tolist()
    guides = [s.guide for s in seqs]
    if any(g is not None for g in guides):
        guided.advance(guides, tokens)
    logprobs.record(masked, seqs, tokens)  # of the raw (grammar-masked) distribution: see engine/logprobs.py
    return tokens
