"""A Qwen2 tokenizer's files → a `tokenizers.Tokenizer`: where the files are (`resolve_pretrained_dir`: a local folder
or a hub repo), the byte-level BPE pipeline built from `vocab.json` + `merges.txt` (`build_qwen2_bpe`), and the
special tokens of `tokenizer_config.json` merged in (`merge_added_tokens`)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..configuration import hub_offline

# Qwen2's pre-tokenizer split (a GPT-4-like regex: single digits, letter runs, punctuation runs, newline runs).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE, CONFIG_FILE = "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


def resolve_pretrained_dir(name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None,
                           revision: str | None = None, cache_dir: str | None = None, token: str | None = None,
                           local_files_only: bool = False) -> Path:
    """Local directory as-is, else a Hugging Face hub id fetched with `huggingface_hub.snapshot_download`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not _HUB_ID.match(name):
        raise ValueError(f"{name!r} is neither a checkpoint directory nor a Hugging Face hub id (owner/name).")
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a declared dependency
        raise ValueError(f"{name!r} is not a local directory and huggingface_hub is not installed.") from e
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, revision=revision, cache_dir=cache_dir,
                                      token=token, local_files_only=local_files_only or offline))
    except Exception as e:
        mode = "HF_HUB_OFFLINE is set, so only the local cache was searched" if offline else (
            "download failed (no network? set HF_HUB_OFFLINE=1 to use only the local cache)")
        raise ValueError(f"Could not load {name!r}: not a local directory and not obtainable from the Hugging Face "
                         f"hub ({mode}): {type(e).__name__}: {e}") from e


def token_str(value: Any) -> str | None:
    """Config files store tokens either as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: a merge must be two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen2_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The Qwen2 byte-level BPE pipeline (same as what `tokenizer.json` of Qwen2 checkpoints serializes)."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _added_token(entry: dict) -> AddedToken:
    return AddedToken(entry["content"], single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                      rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", False),
                      special=entry.get("special", True))


def merge_added_tokens(tok: Tokenizer, added: dict[int, dict]) -> Tokenizer:
    """Register `added_tokens_decoder` entries with their exact ids.

    `tokenizers` appends new added tokens at the next free id, so a token whose id is not next (a gap) is first
    written into the model vocabulary through the JSON form; afterwards every id is checked.
    """
    registered = {t.content for t in tok.get_added_tokens_decoder().values()}
    gaps = []
    for idx, entry in sorted(added.items()):
        content, existing = entry["content"], tok.token_to_id(entry["content"])
        if existing is not None and existing != idx:
            raise ValueError(f"Added token {content!r} has id {idx} in tokenizer_config.json but {existing} in the vocabulary.")
        if existing is None and idx != tok.get_vocab_size(with_added_tokens=True):
            gaps.append((idx, entry))
        elif content not in registered:
            tok.add_tokens([_added_token(entry)])
    if gaps:
        data = json.loads(tok.to_str())
        for idx, entry in gaps:
            data["added_tokens"].append({"id": idx, "content": entry["content"], "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True, **entry})
        # Deserialization re-numbers added tokens missing from the model vocab, so pin every one of them there.
        for t in data["added_tokens"]:
            data["model"]["vocab"][t["content"]] = t["id"]
        tok = Tokenizer.from_str(json.dumps(data))
    for idx, entry in added.items():
        if tok.token_to_id(entry["content"]) != idx:
            raise ValueError(f"Could not register added token {entry['content']!r} with id {idx}.")
    return tok
