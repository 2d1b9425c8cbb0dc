"""SFT data: JSONL conversations, media resolution, label masking and batch collation.

A training record is ``{"messages": [...]}`` in the processor's message format (other keys are kept, e.g. ``meta``):
``{"role": "user", "content": [{"type": "image", "image": "imgs/0.png"}, {"type": "text", "text": "..."}]}``.
Image / video strings that are relative paths are resolved against the JSONL file's folder when loading.

Labels (``build_labels``): -100 everywhere except the tokens of assistant turns, i.e. what follows each
``<|im_start|>assistant\\n`` header up to and including the turn's ``<|im_end|>``. Padding is -100 too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..processing.media import load_image

IGNORE_INDEX = -100
_MEDIA_KEYS = {"image": ("image", "url", "path", "image_url"), "video": ("video", "url", "path")}


# ----------------------------------------------------------------------------------------------- records
def _resolve(value: Any, root: Path) -> Any:
    """A relative local path → absolute (against ``root``); URLs, data URIs, absolute paths, objects unchanged."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith("data:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else root / p)


def resolve_media_paths(messages: list[dict], root: str | os.PathLike) -> list[dict]:
    """Copy of ``messages`` with relative image / video paths made absolute against ``root``."""
    root = Path(root)
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            blocks = []
            for block in content:
                block = dict(block)
                kind = block.get("type")
                for key in _MEDIA_KEYS.get(kind, ()):
                    if key in block:
                        block[key] = _resolve(block[key], root)
                blocks.append(block)
            msg = {**msg, "content": blocks}
        out.append(msg)
    return out


def check_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        raise ValueError(f"{where}: expected an object with a non-empty 'messages' list")
    for m in rec["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: every message needs a role of system / user / assistant")
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise ValueError(f"{where}: the conversation has no assistant turn to train on")
    return rec


def load_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Read a JSONL file of ``{"messages": [...]}`` records; relative media paths → absolute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    root = path.resolve().parent
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            rec = dict(check_record(rec, f"{path}:{n}"))
            rec["messages"] = resolve_media_paths(rec["messages"], root)
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def media_of(messages: list[dict]) -> tuple[list, list]:
    """Image and video sources in order of appearance (what the chat template turns into placeholders)."""
    images, videos = [], []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            kind = block.get("type")
            if kind in ("image", "video"):
                src = next((block[k] for k in _MEDIA_KEYS[kind] if k in block), None)
                if src is None:
                    raise ValueError(f"a {kind} block has no source ({'/'.join(_MEDIA_KEYS[kind])} key)")
                (images if kind == "image" else videos).append(src)
    return images, videos


# ----------------------------------------------------------------------------------------------- labels
def assistant_header_ids(tokenizer) -> list[int]:
    """Token ids of the assistant turn header ``<|im_start|>assistant\\n``."""
    ids = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not ids or ids[0] != tokenizer.convert_tokens_to_ids("<|im_start|>"):
        raise ValueError("the tokenizer does not know the <|im_start|> chat token")
    return ids


def build_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, header: Sequence[int],
                 end_id: int) -> torch.Tensor:
    """input_ids (B,S) → labels (B,S): input ids inside assistant turns (after ``header``, through ``end_id``),
    IGNORE_INDEX elsewhere (system / user turns, headers, media placeholders, padding)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    header = list(header)
    h = len(header)
    for b, row in enumerate(input_ids.tolist()):
        n = len(row)
        i = 0
        while i <= n - h:
            if row[i:i + h] == header:
                j = i + h
                while j < n and row[j] != end_id:
                    j += 1
                stop = min(j + 1, n)  # include the turn's end token
                labels[b, i + h:stop] = input_ids[b, i + h:stop]
                i = stop
            else:
                i += 1
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels


# ----------------------------------------------------------------------------------------------- collation
class SFTCollator:
    """records → padded batch (``BatchFeature``) with ``labels``.

    ``processor``: a ``Qwen2VLProcessor`` (``apply_chat_template(..., tokenize=False)`` and
    ``__call__(text=, images=, videos=, padding=True, return_tensors="pt")``). ``max_length`` drops records whose
    rendered conversation is longer (truncation would cut media placeholders or answers); ``processor_kwargs``
    go to every processor call (e.g. ``max_pixels``, ``fps``).
    """

    def __init__(self, processor, max_length: int | None = None, processor_kwargs: dict | None = None,
                 load_media: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.header = assistant_header_ids(self.tokenizer)
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.max_length = max_length
        self.processor_kwargs = dict(processor_kwargs or {})
        self.load_media = load_media
        self.skipped = 0

    def _load_image(self, src):
        if not self.load_media:
            return src
        return load_image(src)

    def texts_and_media(self, records: Iterable[dict], add_generation_prompt: bool = False):
        texts, images, videos = [], [], []
        for rec in records:
            msgs = rec["messages"]
            texts.append(self.processor.apply_chat_template(msgs, tokenize=False,
                                                            add_generation_prompt=add_generation_prompt))
            imgs, vids = media_of(msgs)
            images += [self._load_image(s) for s in imgs]
            videos += vids
        return texts, images, videos

    def encode(self, texts: list[str], images: list, videos: list):
        kwargs = dict(self.processor_kwargs)
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)

    def __call__(self, records: Sequence[dict]):
        texts, images, videos = self.texts_and_media(records)
        batch = self.encode(texts, images, videos)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            lengths = batch["attention_mask"].sum(1).tolist()
            keep = [r for r, n in zip(records, lengths) if n <= self.max_length]
            self.skipped += len(records) - len(keep)
            if not keep:
                raise ValueError(f"every record of a batch is longer than max_length={self.max_length}")
            return self(keep)
        batch["labels"] = build_labels(batch["input_ids"], batch["attention_mask"], self.header, self.end_id)
        return batch


def split_prompt_answer(rec: dict) -> tuple[dict, str]:
    """A record ending with an assistant text turn → (record without that turn, the answer text)."""
    msgs = rec["messages"]
    last = msgs[-1]
    if last["role"] != "assistant":
        raise ValueError("the last message is not an assistant turn")
    content = last["content"]
    answer = content if isinstance(content, str) else "".join(
        b.get("text", "") for b in content if b.get("type") == "text")
    return {**rec, "messages": msgs[:-1]}, answer
