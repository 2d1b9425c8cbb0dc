"""Logits processors, warpers and token selection (transformers semantics, fp32 scores).

All functions take and return `scores (B, V)` float32 (B running rows, V vocab). Order of application, as
transformers 5.24: repetition penalty → min-length EOS suppression → (sampling only) temperature → top-k →
top-p → min-p. Filtered entries are set to -inf. Nothing here synchronises with the host.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every token id already present in the sequence (`seen (B,V)` bool): logit / penalty when positive,
    logit * penalty when negative (CTRL penalty, as `RepetitionPenaltyLogitsProcessor`)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B,S) prompt ids + mask → (B,V) bool "id occurs in the prompt". Pad positions (mask 0) are ignored, as
    transformers 5.24 does via `prompt_ignore_length`, so a padded row is penalised like the same row alone."""
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    ids = input_ids.masked_fill(attention_mask == 0, vocab_size).clamp(0, vocab_size)  # pads → spare column
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size].contiguous()


def temperature_warp(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th kept too)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability is <= 1 - top_p."""
    ascending, order = torch.sort(scores, dim=-1)
    cum = ascending.softmax(-1).cumsum(-1)
    drop_sorted = cum <= 1 - top_p
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def min_p_filter(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    probs = scores.softmax(-1)
    drop = probs < min_p * probs.amax(-1, keepdim=True)
    if min_tokens_to_keep > 1:  # with 1, the argmax always survives (its probability is the max)
        keep = torch.topk(scores, min(min_tokens_to_keep, scores.shape[-1]), dim=-1).indices
        drop = drop.scatter(-1, keep, False)
    return scores.masked_fill(drop, NEG_INF)


def warp(scores: torch.Tensor, settings) -> torch.Tensor:
    """The sampling warpers in transformers' order: scores (B,V) float32 → filtered scores (B,V). `settings`: any
    object with `temperature`, `top_k`, `top_p`, `min_p` (generate's LogitsPipeline, the engine's
    SamplingParams); a min_p of None or 0 filters nothing and is skipped."""
    if settings.temperature != 1.0:
        scores = temperature_warp(scores, settings.temperature)
    if settings.top_k:
        scores = top_k_filter(scores, settings.top_k)
    if settings.top_p < 1.0:
        scores = top_p_filter(scores, settings.top_p)
    if settings.min_p:
        scores = min_p_filter(scores, float(settings.min_p))
    return scores


def ban_bad_words(scores: torch.Tensor, history, single: torch.Tensor, multi: list[list[int]]) -> torch.Tensor:
    """`NoBadWordsLogitsProcessor`: single-token bad words (E,) are always -inf; the last token of a longer bad
    word is -inf where the sequence so far (`history()` → (B,L) ids) ends with the word's other tokens."""
    if single.numel():
        scores = scores.index_fill(-1, single, NEG_INF)
    if multi:
        seq = history()
        for word in multi:
            prefix = seq.new_tensor(word[:-1])
            if word[-1] >= scores.shape[-1] or seq.shape[1] < prefix.numel():
                continue
            hit = (seq[:, seq.shape[1] - prefix.numel():] == prefix).all(-1)          # (B,)
            scores[:, word[-1]] = torch.where(hit, NEG_INF, scores[:, word[-1]])
    return scores


def remove_invalid(scores: torch.Tensor) -> torch.Tensor:
    """`InfNanRemoveLogitsProcessor`: nan → 0, ±inf → the dtype's largest / smallest finite value."""
    info = torch.finfo(scores.dtype)
    return torch.nan_to_num(scores, nan=0.0, posinf=info.max, neginf=info.min)


class LogitsPipeline:
    """The processors/warpers one `generate` call needs, built from a resolved `GenerationConfig`.

    `eos_ids (E,)` long tensor on the scores' device (ids outside the vocab are ignored); `min_new_tokens`: EOS
    is masked while fewer new tokens than that exist (MinNewTokensLength/MinLength processors)."""

    def __init__(self, config, eos_ids: torch.Tensor, min_new_tokens: int, vocab_size: int):
        self.penalty = float(config.repetition_penalty)
        self.eos_ids = eos_ids[eos_ids < vocab_size]
        self.min_new_tokens = min_new_tokens
        self.do_sample = bool(config.do_sample)
        self.temperature = float(config.temperature)
        self.top_k = int(config.top_k or 0)
        self.top_p = float(config.top_p)
        self.min_p = config.min_p
        self.remove_invalid = bool(config.remove_invalid_values)
        eos = set(self.eos_ids.tolist())
        words = [list(w) for w in (config.bad_words_ids or []) if not (len(w) == 1 and w[0] in eos)]  # as the ref.
        self.bad_single = torch.tensor([w[0] for w in words if len(w) == 1 and w[0] < vocab_size],
                                       dtype=torch.long, device=eos_ids.device)
        self.bad_multi = [w for w in words if len(w) > 1]

    @property
    def needs_history(self) -> bool:
        """Whether __call__ needs the tokens so far (multi-token bad words)."""
        return bool(self.bad_multi)

    @property
    def uses_penalty(self) -> bool:
        return self.penalty != 1.0

    def __call__(self, scores: torch.Tensor, seen: torch.Tensor | None, step: int, history=None) -> torch.Tensor:
        """scores (B,V) float32 raw logits of new token number `step` (0-based) → processed scores (B,V).
        `history()`: the (B,L) token ids so far, asked for only when `needs_history`."""
        if self.uses_penalty:
            scores = apply_repetition_penalty(scores, seen, self.penalty)
        if self.bad_single.numel() or self.bad_multi:
            scores = ban_bad_words(scores.clone() if self.bad_multi else scores, history, self.bad_single,
                                   self.bad_multi)
        if step < self.min_new_tokens and self.eos_ids.numel():
            scores = scores.index_fill(-1, self.eos_ids, NEG_INF)
        if self.remove_invalid:
            scores = remove_invalid(scores)
        if not self.do_sample:
            return scores
        return warp(scores, self)

    def select(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Processed scores (B,V) → next token ids (B,) long: argmax, or a sample from softmax(scores)."""
        if not self.do_sample:
            return scores.argmax(-1)
        return sample_from_scores(scores, generator)


def sample_from_scores(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(scores) without a host sync.

    Uses the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) is distributed as Categorical(p)), which
    unlike `torch.multinomial` needs no device-side validity check; the same generator state gives the same
    tokens."""
    probs = scores.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)
