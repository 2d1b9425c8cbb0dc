"""OpenAI `logprobs` for chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.

`token` is the token's text and `bytes` its raw UTF-8 bytes (a byte-level BPE token may hold part of a character:
its text then shows U+FFFD, its bytes stay exact). The numbers come from the engine (`qwen2vl.engine.logprobs`:
the raw model distribution, before penalties and temperature, as vLLM's default).
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte → printable-character table (GPT-2's `bytes_to_unicode`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    if int(token_id) in tokenizer.added_tokens_decoder:  # special / added tokens are stored as plain text
        return piece.encode("utf-8")
    table = _byte_decoder()
    return bytes(table[c] for c in piece if c in table)


def _entry(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(raw)}


def openai_logprobs(tokenizer, token_ids: list[int], entries: list | None) -> dict | None:
    """token ids + their engine.logprobs.TokenLogprob entries → the OpenAI choice `logprobs` object."""
    if entries is None:
        return None
    content = []
    for t, e in zip(token_ids, entries):
        item = _entry(tokenizer, t, e.logprob)
        item["top_logprobs"] = [_entry(tokenizer, i, lp) for i, lp in e.top]
        content.append(item)
    return {"content": content}
