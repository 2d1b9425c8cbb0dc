"""Stopping: stop strings (host side, needs the tokenizer) and the lazy read-back of the on-device
"finished" flags.

Stop strings follow transformers' `StopStringCriteria`: a sequence stops at the token that completes a stop
string in the decoded text of its ids (the string may begin in earlier tokens, even in the prompt, and the
completing token may run past its end); the ids of the stop string stay in the output.
"""
from __future__ import annotations

from typing import Any

import torch


class StopStringChecker:
    """Decodes a short tail of each sequence after every step; `tail` covers the longest stop string
    (a token decodes to >= 1 byte, so a string of n UTF-8 bytes spans <= n tokens, plus one overhanging)."""

    def __init__(self, stop_strings: str | list[str], tokenizer: Any):
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer to decode the generated tokens: pass "
                             "generate(..., stop_strings=..., tokenizer=tokenizer).")
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer must have a decode(ids) method, got {type(tokenizer).__name__}")
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        self.tail = max(len(s.encode("utf-8")) for s in self.strings) + 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """(B,S) prompt → per-row host lists of the last real prompt tokens (the tails `update` extends)."""
        rows = zip(input_ids.cpu().tolist(), attention_mask.cpu().tolist())
        return [[t for t, m in zip(ids, mask) if m][-self.tail:] for ids, mask in rows]

    def update(self, tails: list[list[int]], new_tokens: list[int]) -> list[bool]:
        """Append each row's new token to its tail; True where that token completes a stop string."""
        out = []
        for ids, t in zip(tails, new_tokens):
            ids.append(t)
            del ids[:-self.tail - 1]
            now, before = self._decode(ids), self._decode(ids[:-1])
            out.append(any(now.count(s) > before.count(s) for s in self.strings))
        return out


class FinishedFlags:
    """Reads the on-device `finished (B,)` flags back to the host without stalling the device queue.

    On CUDA a non-blocking copy into pinned memory is issued and an event recorded; `poll()` returns the flags
    only once the event completed (typically a step or two later), else None, so the host never waits for the
    device. The cost: a row that finished may run a step or two more before it is dropped (its extra tokens
    are overwritten with padding on the device, so outputs are unaffected). On CPU (or with `eager=True`, used
    when the host needs every token anyway: streamers, stop strings) the flags are read at once."""

    def __init__(self, device: torch.device, eager: bool, batch_size: int):
        self.async_mode = device.type == "cuda" and not eager
        self.host = torch.empty(batch_size, dtype=torch.bool, pin_memory=True) if self.async_mode else None
        self.pending: tuple[int, torch.cuda.Event] | None = None

    def submit(self, finished: torch.Tensor) -> None:
        """Start reading `finished (B,)` back (no-op while a read is in flight, or when not asynchronous)."""
        if not self.async_mode or self.pending is not None:
            return
        n = finished.shape[0]
        self.host[:n].copy_(finished, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (n, event)

    def ready(self) -> bool:
        return self.pending[1].query()

    def poll(self, finished: torch.Tensor) -> list[bool] | None:
        """The flags of the rows as laid out when `submit` was called (None: not available yet). Callers only
        re-arrange rows after a poll returned flags, so that layout is the current one."""
        if not self.async_mode:
            return finished.tolist()
        if self.pending is None or not self.ready():
            return None
        n, _ = self.pending
        self.pending = None
        return self.host[:n].tolist()
