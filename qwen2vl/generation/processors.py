"""Custom logits processors for `generate(..., logits_processor=...)`, and the grammar-constrained one.

A processor is any callable `(input_ids (R, L) long, scores (R, V) float32) -> scores (R, V)`, as in transformers
(`LogitsProcessorList` instances work unchanged). `generate` calls them on the raw logits of the rows still
running, before its own processors (repetition penalty, min-length) and warpers; for masking processors this is
the same as transformers' order (custom processors after the built-in processors, before the warpers).

`GrammarLogitsProcessor(tokenizer, json_schema=... | regex=... | choice=[...] | grammar=...)` masks every
token the constraint forbids (llguidance, see `qwen2vl.guided_decoding`). `generate` drops finished rows from the
running batch, so a row is not identified by its index: each row's grammar state is looked up by the tokens it
has generated so far (its ids after the prompt), which also makes the processor correct for
`num_return_sequences > 1`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import guided_decoding as guided


def as_processor_list(logits_processor) -> list:
    """None, one callable or an iterable of callables → a list (ValueError for anything else)."""
    if logits_processor is None:
        return []
    procs = [logits_processor] if callable(logits_processor) else list(logits_processor)
    for p in procs:
        if not callable(p):
            raise ValueError(f"logits_processor entries must be callables (input_ids, scores) -> scores, "
                             f"got {type(p).__name__}")
    return procs


def apply_processors(procs: list, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for p in procs:
        scores = p(input_ids, scores)
    return scores


class GrammarLogitsProcessor:
    """Constrain `generate` to a JSON schema / regex / choice list / Lark-GBNF grammar (exactly one).

    `tokenizer`: our `Qwen2TokenizerFast`; `vocab_size`: the model's logits width (default: the tokenizer's size,
    rounded to the scores' width at the first call); `eos_token_id`: token(s) allowed once the grammar is
    complete (default: the tokenizer's EOS) — pass the same ids as `generate(eos_token_id=...)` so that the
    sequence ends there. One processor serves one `generate` call (it remembers the prompt length)."""

    def __init__(self, tokenizer, *, json_schema=None, regex=None, choice=None, grammar=None,
                 eos_token_id: int | list[int] | None = None):
        spec = SimpleNamespace(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar)
        self.grammar = guided.compile_grammar(spec)
        if self.grammar is None:
            raise ValueError("GrammarLogitsProcessor needs one of json_schema, regex, choice or grammar.")
        self.tokenizer = tokenizer
        eos = eos_token_id if eos_token_id is not None else tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.gt: guided.GuideTokenizer | None = None
        self.prompt_len: int | None = None
        self.states: dict[tuple, list[guided.Guide]] = {}  # generated ids so far → guides at that point

    def _guide_for(self, generated: tuple) -> guided.Guide:
        """The guide that has consumed `generated` (advanced from the one at generated[:-1])."""
        if not generated:
            return guided.Guide(self.gt, self.grammar)
        waiting = self.states.get(generated[:-1])
        if not waiting:
            raise ValueError("GrammarLogitsProcessor: unknown row history (one processor serves one generate "
                             "call, over left-padded prompts).")
        guide = waiting.pop()
        guide.consume(generated[-1])
        return guide

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.gt is None:
            self.gt = guided.GuideTokenizer(self.tokenizer, scores.shape[-1], self.eos_ids)
            self.prompt_len = input_ids.shape[1]
        rows = [tuple(r) for r in input_ids[:, self.prompt_len:].tolist()]
        guides = [self._guide_for(r) for r in rows]
        self.states = {}
        for r, g in zip(rows, guides):
            self.states.setdefault(r, []).append(g)
        return guided.mask_logits(scores, guides)
