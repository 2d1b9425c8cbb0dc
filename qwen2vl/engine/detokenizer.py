"""Incremental detokenization with stop strings.

Byte-level BPE tokens may end in the middle of a UTF-8 character; text is only committed once the decoded
suffix no longer ends in U+FFFD (the vLLM prefix/read-offset scheme), or once 4 tokens are pending (a UTF-8
character has at most 4 bytes, so the bytes are invalid for good and their U+FFFD is final). Stop strings are searched in the new text
(plus an overlap of max(len(stop)) - 1 characters); while a sequence runs, that many trailing characters are held
back from `visible_text` so a streamed delta never shows the beginning of a stop string that later matches.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stops = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the context re-decoded to get the next delta right
        self.read = 0
        self.text = ""
        self.final = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special) if ids else ""

    def add(self, token: int, check_stop: bool = True) -> str | None:
        """Append one token; return the stop string that matched (text is then truncated and final)."""
        if self.tokenizer is None or self.final:
            return None
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and len(self.ids) - self.read < 4):
            return None
        start = len(self.text)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        if not (check_stop and self.stops):
            return None
        lo = max(0, start - self.hold)
        best = None
        for s in self.stops:
            i = self.text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.final = True
        return s

    def finish(self) -> None:
        """Flush tokens still waiting for the rest of a UTF-8 character (they decode with U+FFFD)."""
        if self.tokenizer is not None and not self.final and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            after = self._decode(self.ids[self.prefix:])
            self.text += after[len(before):]
            self.read = len(self.ids)
        self.final = True

    def visible_text(self, final: bool = False) -> str:
        if final or self.final or not self.hold:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
