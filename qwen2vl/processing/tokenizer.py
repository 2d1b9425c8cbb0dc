"""Qwen2 byte-level BPE tokenizer built on the `tokenizers` library (no `transformers` dependency).

Loads `tokenizer.json` when the checkpoint has one; otherwise builds the Qwen2 pipeline from `vocab.json` +
`merges.txt` (NFC normalizer, Qwen2 split regex + ByteLevel without its own regex, ByteLevel decoder). The special
tokens of `tokenizer_config.json` (`added_tokens_decoder`) are always merged in, because some Qwen2-VL repos ship a
`tokenizer.json` without the vision tokens (REFERENCE §1.5). There is no BOS and no post-processor: encoding adds
nothing, so `add_special_tokens` has no effect (kept for API compatibility).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE

from .batch_feature import BatchFeature
from .chat_template import tokenizer_apply_chat_template
from .tokenizer_files import (CONFIG_FILE, MERGES_FILE, TOKENIZER_FILE, VOCAB_FILE,  # noqa: F401 (re-exported)
                              build_qwen2_bpe, merge_added_tokens, read_merges, resolve_pretrained_dir, token_str)


class Qwen2TokenizerFast:
    """`transformers.Qwen2Tokenizer`-compatible tokenizer (ids, decoding, padding, truncation, saving)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE, "merges_file": MERGES_FILE, "tokenizer_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, tokenizer_object: Tokenizer, *, eos_token: str | None = "<|endoftext|>",
                 pad_token: str | None = "<|endoftext|>", unk_token: str | None = None, bos_token: str | None = None,
                 additional_special_tokens: Iterable[str] = (), padding_side: str = "left",
                 truncation_side: str = "right", model_max_length: int = 32768, chat_template: str | None = None,
                 split_special_tokens: bool = False, **init_kwargs):
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError(f"padding_side/truncation_side must be 'left' or 'right', got {padding_side!r}/"
                             f"{truncation_side!r}")
        self._tokenizer = tokenizer_object
        self.eos_token, self.pad_token = token_str(eos_token), token_str(pad_token)
        self.unk_token, self.bos_token = token_str(unk_token), token_str(bos_token)
        self.additional_special_tokens = [token_str(t) for t in additional_special_tokens]
        # Like transformers, every declared special token exists as a special added token.
        missing = [t for t in self.all_special_tokens if self._tokenizer.token_to_id(t) is None]
        if missing:
            self._tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = int(model_max_length)
        self.chat_template = chat_template
        self.split_special_tokens = bool(split_special_tokens)
        self.init_kwargs = init_kwargs  # other tokenizer_config.json keys, written back by save_pretrained
        self._lock = threading.Lock()
        self._split_tokenizer: Tokenizer | None = None  # twin encoding special-token text as plain text

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "Qwen2TokenizerFast":
        """Load from a checkpoint directory or hub id; `kwargs` override `tokenizer_config.json` values."""
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        path = resolve_pretrained_dir(name_or_path, ["*.json", "*.txt", "*.jinja"], **hub)
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")) if (path / CONFIG_FILE).exists() else {}
        if (path / TOKENIZER_FILE).exists():
            tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        elif (path / VOCAB_FILE).exists() and (path / MERGES_FILE).exists():
            vocab = json.loads((path / VOCAB_FILE).read_text(encoding="utf-8"))
            tok = build_qwen2_bpe(vocab, read_merges(path / MERGES_FILE))
        else:
            raise ValueError(f"{path} has neither {TOKENIZER_FILE} nor {VOCAB_FILE} + {MERGES_FILE}.")
        added = {int(k): dict(v) for k, v in config.pop("added_tokens_decoder", {}).items()}
        tok = merge_added_tokens(tok, added)
        if "chat_template" not in config:
            for fname in ("chat_template.jinja", "chat_template.json"):
                if (path / fname).exists():
                    text = (path / fname).read_text(encoding="utf-8")
                    config["chat_template"] = json.loads(text)["chat_template"] if fname.endswith("json") else text
                    break
        for key in ("tokenizer_class", "name_or_path", "auto_map", "tokenizer_file", "vocab_file", "merges_file",
                    "backend", "is_local", "local_files_only"):
            config.pop(key, None)
        extra = config.pop("extra_special_tokens", None)  # transformers 5.x name (list, or dict of named tokens)
        if extra:
            extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
            config["additional_special_tokens"] = list(dict.fromkeys(
                [token_str(t) for t in config.get("additional_special_tokens") or []] + [token_str(t) for t in extra]))
        config.update(kwargs)
        config.setdefault("padding_side", "left")  # generation wants left padding (REFERENCE §12.22)
        if config.get("model_max_length") is None:
            config["model_max_length"] = 32768
        return cls(tok, **config)

    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and (for BPE models) vocab.json + merges.txt."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(out / TOKENIZER_FILE))
        files = [str(out / TOKENIZER_FILE)]
        if isinstance(self._tokenizer.model, BPE):
            files += self._tokenizer.model.save(str(out))
        config = {k: v for k, v in self.init_kwargs.items() if k != "chat_template"}
        config.update({
            "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                              "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                                     for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())},
            "additional_special_tokens": self.additional_special_tokens, "bos_token": self.bos_token,
            "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token,
            "padding_side": self.padding_side, "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length, "split_special_tokens": self.split_special_tokens,
            "tokenizer_class": "Qwen2Tokenizer",
        })
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return tuple(files + [str(out / CONFIG_FILE)])

    # ------------------------------------------------------------------ vocabulary / special tokens
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as in transformers)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._tokenizer.get_added_tokens_decoder().items()))

    @property
    def all_special_tokens(self) -> list[str]:
        named = [self.eos_token, self.pad_token, self.bos_token, self.unk_token]
        return list(dict.fromkeys(t for t in named + self.additional_special_tokens if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tokenizer.token_to_id(t) for t in self.all_special_tokens]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    eos_token_id = property(lambda self: self._id_or_none(self.eos_token))
    pad_token_id = property(lambda self: self._id_or_none(self.pad_token))
    bos_token_id = property(lambda self: self._id_or_none(self.bos_token))
    unk_token_id = property(lambda self: self._id_or_none(self.unk_token))

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Unknown tokens map to None (there is no unk token), like transformers for Qwen2."""
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self._tokenizer.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in _as_id_list(ids) if int(i) not in special]

    # ------------------------------------------------------------------ encoding
    def _encode_texts(self, texts: list[str], split_special_tokens: bool | None) -> list[list[int]]:
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        tok = self._tokenizer
        if split != tok.encode_special_tokens:
            # A separate instance instead of flipping the shared flag, so concurrent callers are unaffected.
            with self._lock:
                if self._split_tokenizer is None or self._split_tokenizer.encode_special_tokens != split:
                    twin = Tokenizer.from_str(tok.to_str())
                    twin.encode_special_tokens = split
                    self._split_tokenizer = twin
            tok = self._split_tokenizer
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def __call__(self, text: str | list[str], text_pair: Any = None, add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True,
                 split_special_tokens: bool | None = None, **kwargs) -> BatchFeature:
        """Tokenize one text (flat lists) or a batch (nested lists); `return_tensors` always gives (B, S)."""
        if text_pair is not None:
            raise ValueError("Qwen2TokenizerFast does not support text pairs.")
        kwargs.pop("return_token_type_ids", None)
        if kwargs:
            warnings.warn(f"Keyword arguments {sorted(kwargs)} not recognized by the tokenizer; ignored.", stacklevel=2)
        batched = not isinstance(text, str)
        texts = list(text) if isinstance(text, (list, tuple)) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text input must be of type `str` (single example) or `list[str]` (batch).")
        ids = self._encode_texts(texts, split_special_tokens)
        limit = self._truncation_length(truncation, max_length)
        if limit is not None:
            ids = [x[:limit] if self.truncation_side == "right" else x[max(len(x) - limit, 0):] for x in ids]
        data = self._pad({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}, padding, max_length,
                         pad_to_multiple_of, padding_side)
        if not return_attention_mask:
            data.pop("attention_mask")
        if return_tensors is not None and len({len(x) for x in data["input_ids"]}) > 1:
            raise ValueError("Unable to create tensor, you should probably activate truncation and/or padding with "
                             "'padding=True' 'truncation=True' to have batched tensors with the same length.")
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    def encode(self, text: str, add_special_tokens: bool = True, padding: bool | str = False,
               truncation: bool | str | None = None, max_length: int | None = None,
               return_tensors: str | None = None, **kwargs) -> list[int] | torch.Tensor:
        out = self(text, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors, **kwargs)
        return out["input_ids"]

    def _truncation_length(self, truncation: bool | str | None, max_length: int | None) -> int | None:
        if truncation is None:  # transformers: a max_length without explicit truncation truncates
            truncation = max_length is not None
        if truncation in (False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"Unsupported truncation={truncation!r}; use True, False, 'longest_first' or 'only_first'.")
        limit = self.model_max_length if max_length is None else max_length
        if limit < 0:
            raise ValueError(f"max_length must be non-negative, got {limit}")
        return limit

    def pad(self, encoded: dict, padding: bool | str = True, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, padding_side: str | None = None,
            return_tensors: str | None = None) -> BatchFeature:
        """Pad already-tokenized sequences (`{"input_ids": [[...], ...]}`, optional attention_mask)."""
        ids = [list(_as_id_list(x)) for x in encoded["input_ids"]]
        mask = encoded.get("attention_mask")
        mask = [list(_as_id_list(m)) for m in mask] if mask is not None else [[1] * len(x) for x in ids]
        return BatchFeature(self._pad({"input_ids": ids, "attention_mask": mask}, padding, max_length,
                                      pad_to_multiple_of, padding_side), tensor_type=return_tensors)

    def _pad(self, data: dict, padding: bool | str, max_length: int | None, pad_to_multiple_of: int | None,
             padding_side: str | None) -> dict:
        if padding in (False, None, "do_not_pad"):
            return data
        if padding in (True, "longest"):
            target = max((len(x) for x in data["input_ids"]), default=0)
        elif padding == "max_length":
            target = self.model_max_length if max_length is None else max_length
        else:
            raise ValueError(f"Unsupported padding={padding!r}; use True, False, 'longest' or 'max_length'.")
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token.")
        out: dict[str, list] = {"input_ids": [], "attention_mask": []}
        for ids, mask in zip(data["input_ids"], data["attention_mask"]):
            n = max(target - len(ids), 0)
            out["input_ids"].append([pad_id] * n + ids if side == "left" else ids + [pad_id] * n)
            out["attention_mask"].append([0] * n + mask if side == "left" else mask + [0] * n)
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs) -> str | list[str]:
        """Decode one sequence (a 2-D input gives a list of strings, as transformers 5.x does).

        `clean_up_tokenization_spaces` is accepted but not applied: transformers 5.x ignores it for byte-level BPE
        because it corrupts the text (strips spaces before punctuation), and the Qwen2 config sets it to False.
        """
        if isinstance(token_ids, (torch.Tensor, np.ndarray)) and token_ids.ndim == 2 or (
                isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple))):
            return self.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._tokenizer.decode(_as_id_list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs) -> list[str]:
        seqs = [_as_id_list(s) for s in sequences]
        return self._tokenizer.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: list, chat_template: str | None = None, **kwargs):
        """Text-only chat templating (placeholders are not expanded; use the processor for media). Keyword
        arguments: tokenize=True, add_generation_prompt, continue_final_message, return_tensors, return_dict, and
        template variables."""
        return tokenizer_apply_chat_template(self, conversation, chat_template=chat_template, **kwargs)


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.reshape(-1).tolist()
    return [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path)` → `Qwen2TokenizerFast` (the only tokenizer family here)."""

    from_pretrained = staticmethod(Qwen2TokenizerFast.from_pretrained)


Qwen2Tokenizer = Qwen2TokenizerFast
Qwen2VLTokenizer = Qwen2TokenizerFast
