"""Structured output: token masks from a grammar (JSON schema, regex, choice list, Lark/GBNF) via `llguidance`.

`compile_grammar(params) -> str | None` turns the constraint of a `SamplingParams` (`json_schema`, `regex`,
`choice`, `grammar`; at most one) into an llguidance grammar, raising ValueError with the library's message for a
bad one (an unsupported JSON-Schema keyword is reported by name: 'Unimplemented keys: ["..."]').
`Guide` is one sequence's matcher; `mask_logits(scores (n, V), guides)` sets every token a row's grammar forbids
to -inf (rows whose guide is None are untouched) and `advance(guides, tokens)` feeds the sampled tokens back.
The masks are computed as 32-bit words per row (in llguidance's thread pool for larger batches on larger
machines), expanded to a bool mask and applied with numpy on the CPU (torch ops on an accelerator).

JSON is generated compactly on one line (`", "` and `": "` separators, no free whitespace): a model can then not
stall in an endless run of blanks, and the output parses with any JSON parser. A schema's own `"x-guidance"`
options override this.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

try:
    import llguidance as llg
    import llguidance.torch as llg_torch
except ImportError:  # pragma: no cover - declared dependency; the message below says what to install
    llg = llg_torch = None

logger = logging.getLogger("qwen2vl.engine")
CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")
# llguidance's thread pool only pays off for several rows on a machine with cores to spare: on a small or busy
# machine its spinning workers slow down the model's own threads (measured on 2 shared cores).
PARALLEL_MIN_ROWS, PARALLEL_MIN_CPUS = 4, 8
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _require() -> None:
    if llg is None:
        raise ValueError("Structured output (json_schema / regex / choice / grammar) needs the `llguidance` "
                         "package: pip install llguidance")


def constraint_of(params) -> tuple[str, object] | None:
    """The one constraint set on `params` as (field name, value), None if none; ValueError if several."""
    set_ = [(k, getattr(params, k, None)) for k in CONSTRAINTS if getattr(params, k, None) is not None]
    if len(set_) > 1:
        raise ValueError(f"Only one of {', '.join(CONSTRAINTS)} may be set, got {', '.join(k for k, _ in set_)}.")
    return set_[0] if set_ else None


def compile_grammar(params) -> str | None:
    """The llguidance grammar (a JSON string) for the constraint of `params`, None when unconstrained."""
    found = constraint_of(params)
    if found is None:
        return None
    _require()
    kind, value = found
    try:
        if kind == "json_schema":
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError("a JSON schema must be a JSON object")
            grammar = llg.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        elif kind == "regex":
            if not isinstance(value, str):
                raise ValueError("must be a string")
            grammar = llg.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not (isinstance(value, (list, tuple)) and value and all(isinstance(c, str) and c for c in value)):
                raise ValueError("must be a non-empty list of non-empty strings")
            grammar = llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        else:
            if not isinstance(value, str):
                raise ValueError("must be a string (Lark or GBNF)")
            grammar = llg.grammar_from("grammar", value)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"Invalid {kind}: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"Invalid {kind}: {messages[0]}")
    return grammar


class GuideTokenizer:
    """The llguidance view of our tokenizer (built once per engine from its `tokenizers` JSON; ~ms for the demo
    vocabulary, ~1 s for Qwen2's 151k). `vocab` is the model's logits width (>= the tokenizer's size: the padding
    rows are never allowed); `eos_ids` are the tokens a finished grammar allows."""

    def __init__(self, tokenizer, vocab: int, eos_ids):
        _require()
        eos = sorted(int(t) for t in eos_ids) or [tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
        self.vocab = vocab
        self.eos_ids = eos
        self.ll = llg.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
        self.executor = llg.LLExecutor()


class Guide:
    """One sequence's grammar state. `failed` once a token the grammar forbids was consumed (cannot happen when
    the mask was applied; then only EOS is allowed, so the sequence ends instead of producing garbage)."""

    def __init__(self, gt: GuideTokenizer, grammar: str):
        self.gt = gt
        self.matcher = llg.LLMatcher(gt.ll, grammar)
        if self.matcher.is_error():
            raise ValueError(f"Invalid grammar: {self.matcher.get_error()}")
        self.failed = False

    def consume(self, token: int) -> None:
        if not self.failed and not self.matcher.consume_token(int(token)):
            logger.warning("structured output: token %d rejected by the grammar (%s)", token,
                           self.matcher.get_error())
            self.failed = True

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped()


def allowed_mask(guides: list[Guide | None], vocab: int) -> torch.Tensor:
    """(n, vocab) bool: True where row i may sample the token (all True for a row without a guide)."""
    n = len(guides)
    # numpy, not torch.full: a torch fill this size wakes the intra-op thread pool (ms on a busy machine)
    bits = torch.from_numpy(np.full((n, (vocab + 31) // 32), -1, dtype=np.int32))
    work = [(g.matcher, i) for i, g in enumerate(guides) if g is not None and not g.failed]
    if len(work) >= PARALLEL_MIN_ROWS and (os.cpu_count() or 1) >= PARALLEL_MIN_CPUS:
        llg_torch.fill_next_token_bitmask_par(guides[work[0][1]].gt.executor, work, bits)
    else:
        for matcher, i in work:
            llg_torch.fill_next_token_bitmask(matcher, bits, i)
    allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    for i, g in enumerate(guides):
        if g is not None and g.failed:
            allowed[i] = False
            allowed[i, g.gt.eos_ids] = True
    return torch.from_numpy(allowed)


def mask_logits(scores: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
    """scores (n, V) → new (n, V) tensor with every forbidden token of a constrained row at -inf."""
    allowed = allowed_mask(guides, scores.shape[-1])
    if scores.device.type == "cpu" and scores.dtype == torch.float32:  # one numpy pass, no intra-op threads
        return torch.from_numpy(np.where(allowed.numpy(), scores.numpy(), np.float32("-inf")))
    return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


def advance(guides: list[Guide | None], tokens: list[int]) -> None:
    for g, t in zip(guides, tokens):
        if g is not None:
            g.consume(t)
