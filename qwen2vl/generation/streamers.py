"""Streamers: receive token ids as `generate` produces them (`put(ids)` then `end()`, the transformers
protocol: the first `put` carries the prompt, later ones one new token each) and emit decoded text.

Text is emitted as soon as it is final: everything decoded so far except a trailing run of U+FFFD, which is
what byte-level BPE decodes an incomplete multi-byte character (Chinese, emoji) to; the held-back part is
emitted once the following tokens complete it, or at `end()`. On a newline the token cache restarts, which
keeps the repeated decode short. Only batch size 1 can be streamed.
"""
from __future__ import annotations

from queue import Queue
from typing import Any

import torch

REPLACEMENT_CHAR = "\ufffd"


class BaseStreamer:
    def put(self, value) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


def _as_token_list(value: Any) -> list[int]:
    """(1,S) / (S,) tensor, or a (nested) list of ints → flat list; more than one row → ValueError."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value[0]
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        if len(value) > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        value = value[0]
    return [int(v) for v in value]


class TextStreamer(BaseStreamer):
    """Prints text to stdout as it is generated.

    tokenizer: anything with `decode(list[int], **decode_kwargs) -> str`; skip_prompt: do not emit the prompt
    (the first `put`); decode_kwargs: passed to `tokenizer.decode` (e.g. skip_special_tokens=True)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value) -> None:
        ids = _as_token_list(value)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        else:
            stable = max(len(text.rstrip(REPLACEMENT_CHAR)), self.print_len)
            printable = text[self.print_len:stable]
            self.print_len = stable
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush whatever is held back (an incomplete character stays U+FFFD) and signal the end."""
        printable = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len:]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Stores the text pieces in a thread-safe queue; iterate over the streamer (typically in another thread
    than `generate`) to get them. `timeout` (seconds) bounds each wait; `queue.Empty` is raised after it."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value
