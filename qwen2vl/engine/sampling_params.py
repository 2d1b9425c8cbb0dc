"""Per-request sampling parameters (names and defaults follow vLLM's `SamplingParams` / the OpenAI API).

`temperature == 0` means greedy decoding (top_p / top_k / min_p / seed are then irrelevant); a temperature below
1e-5 is taken as 0 (as vLLM does): dividing logits by it overflows to inf/NaN and samples garbage.
`seed` makes sampling reproducible per request, independent of what else is in the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

GREEDY_BELOW = 1e-5  # temperatures under this are greedy
MAX_TOP_K = 2**31 - 1


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # structured output (at most one; see qwen2vl.guided_decoding): a JSON schema (dict or JSON text), a regex,
    # a list of allowed strings, or a Lark / GBNF grammar
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    logprobs: int | None = None  # log-probabilities of the sampled token and of the top-k (0..20) per step
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    def validate(self) -> None:
        """Raise ValueError (message names the field) for out-of-range values."""
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}.")

        need(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value), name, "must be a finite number")
        need(self.temperature >= 0, "temperature", "must be >= 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(isinstance(self.top_k, int) and 0 <= self.top_k <= MAX_TOP_K, "top_k",
             f"must be -1, 0 (disabled) or a positive integer up to {MAX_TOP_K}")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        need(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        need(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens", "must be None or an integer >= 1")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens")
        need(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64), "seed",
             "must be an integer in [-2**63, 2**64)")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(0 <= t <= MAX_TOP_K for t in self.stop_token_ids), "stop_token_ids",
             "must be token ids (non-negative integers)")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
             "must be None or an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def clone(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
