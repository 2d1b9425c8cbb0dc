"""How much prefill work one engine step may do beside the decode step of the running sequences (chunked prefill).

Two limits, either or both (neither: whole prompts, no chunking):
* `max_prefill_tokens_per_step` (tokens): a step prefills at most that many prompt tokens, and a picture's vision
  work is sized like that many tokens in flops (the tower's units weighted by `FLOP_WEIGHTS`);
* `max_prefill_ms_per_step` (milliseconds, or "auto": the measured time of one decode step of the running batch):
  a step runs vision units while their predicted time (flops / the measured rate of their kind) fits what is left
  of it, then a text chunk of as many tokens as the measured seconds per token allow (capped by the token limit
  when both are given). A text chunk costs about one pass over the decoder's weights however small it is, so one
  runs only if MIN_TEXT_TOKENS fit, or the step has done no prefill work yet.
Each step does at least one unit of work (a vision unit or a text chunk), so a prompt always progresses; a step's
prefill overshoots its budget by at most one vision unit (a fraction of a decode step on CPU: see vision_job) or a
misjudged text chunk. The estimates are running averages (EMA) of what this process measured.
"""
from __future__ import annotations

import math
import time

from ..model.vision_job import ATTENTION, FLOP_WEIGHTS, LINEAR

EMA = 0.3  # weight of a new measurement in the running averages
# smallest text chunk worth a step of its own: 8 rows are the decode GEMV kernels' largest batch, so such a chunk
# costs about one decode step (one pass over the weights); 16 rows take the GEMM path at ~2 decode steps on the 2B
# (bench_multiturn --unit-costs), which alone made a step 3x a decode step
MIN_TEXT_TOKENS = 8
IDLE_MS = 250.0  # "auto" while nothing decodes yet: only new arrivals wait for the step
AUTO = "auto"


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


def parse_ms(value) -> float | str | None:
    """`max_prefill_ms_per_step` as given (number, numeric string or "auto"); ValueError naming the problem."""
    if value is None or value == AUTO:
        return value
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_prefill_ms_per_step must be a number of milliseconds or 'auto', got {value!r}") \
            from None
    if not ms > 0 or math.isinf(ms):
        raise ValueError(f"max_prefill_ms_per_step must be > 0 milliseconds, got {value!r}")
    return ms


class PrefillBudget:
    def __init__(self, tokens: int | None, ms, token_flops: int, clock=time.perf_counter):
        """tokens / ms: the two limits (see the module docstring); token_flops: a prompt token's flops (the token
        limit's size in vision work); clock: seconds (tests pass a fake one)."""
        if tokens is not None and tokens < 1:
            raise ValueError("max_prefill_tokens_per_step must be >= 1")
        self.tokens, self.ms, self.token_flops, self.clock = tokens, parse_ms(ms), token_flops, clock
        self.decode_s: float | None = None  # a decode step of the running batch (steps without prefill work)
        self.busy_decode_s: float | None = None  # the same beside prefill work (used until the first is measured)
        self.token_s: float | None = None  # seconds per prompt token of a text chunk
        self.rates: dict[str, float] = {}  # vision unit kind -> flops per second
        self.tokens_left: int | None = None  # this step's: token limit left, deadline, whether it did prefill work
        self.deadline: float | None = None
        self.busy = False

    @property
    def chunked(self) -> bool:
        return self.tokens is not None or self.ms is not None

    def step_ms(self, decoding: bool) -> float | None:
        """This step's time budget (None: no time limit)."""
        if self.ms != AUTO:
            return self.ms
        decode_s = self.decode_s if self.decode_s is not None else self.busy_decode_s
        return 1000 * decode_s if decoding and decode_s is not None else IDLE_MS

    def start_step(self, decoding: bool) -> None:
        """A new engine step (`decoding`: some sequences will run a decode step in it)."""
        self.tokens_left, self.busy = self.tokens, False
        ms = self.step_ms(decoding)
        self.deadline = None if ms is None else self.clock() + ms / 1000

    def text_tokens(self) -> int | None:
        """Prompt tokens this step may still prefill (None: no limit; at least 1 while it has done nothing)."""
        if not self.chunked:
            return None
        n = self.tokens_left
        if self.deadline is not None:
            if self.token_s is None:  # not measured yet: a small first chunk, and only on its own
                fit = 0 if self.busy else MIN_TEXT_TOKENS
            else:
                fit = int(max(0.0, self.deadline - self.clock()) / self.token_s)
                fit = fit if fit >= MIN_TEXT_TOKENS else 0 if self.busy else MIN_TEXT_TOKENS
            n = fit if n is None else min(n, fit)
        return max(n, 0 if self.busy else 1)

    def text_done(self, tokens: int, seconds: float) -> None:
        """`tokens` prompt tokens were prefilled in `seconds`."""
        self.busy = True
        if self.tokens_left is not None:
            self.tokens_left -= tokens
        if tokens > 0:
            self.token_s = _ema(self.token_s, seconds / tokens)

    def vision(self) -> tuple[float, dict, bool]:
        """(budget, weights, at least one unit) for `VisionEncodeJob.run`: seconds left with seconds per flop of
        each kind (inf where not measured yet: such a unit runs alone), or the token limit left in flops."""
        if self.deadline is None:
            return (self.tokens_left or 0) * self.token_flops, FLOP_WEIGHTS, not self.busy
        weights = {k: 1 / self.rates[k] if self.rates.get(k) else math.inf for k in (LINEAR, ATTENTION)}
        return max(0.0, self.deadline - self.clock()), weights, not self.busy

    def vision_done(self, spent: float, timings: dict) -> None:
        """Vision units ran: `spent` (in `vision()`'s budget units), timings {kind: (flops, seconds)}."""
        self.busy = self.busy or spent > 0
        if self.deadline is None and self.tokens_left is not None:
            self.tokens_left -= math.ceil(spent / self.token_flops)
        for kind, (flops, seconds) in timings.items():
            if flops and seconds > 0:
                self.rates[kind] = _ema(self.rates.get(kind), flops / seconds)

    def decode_done(self, seconds: float) -> None:
        """A decode step took `seconds`. Only steps without prefill work count: "auto" is the running streams'
        undisturbed step (a decode step beside a prefill runs slower, and following it would let the budget grow
        with the disturbance it causes)."""
        if not self.busy:
            self.decode_s = _ema(self.decode_s, seconds)
        else:
            self.busy_decode_s = _ema(self.busy_decode_s, seconds)
