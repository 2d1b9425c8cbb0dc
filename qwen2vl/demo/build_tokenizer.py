"""A small Qwen2-style byte-level BPE tokenizer for the demo model.

Configured like a real Qwen2 ``tokenizer.json`` (NFC normalizer; pre-tokenizer Sequence[Split(Qwen2 regex,
isolated), ByteLevel(add_prefix_space=False, use_regex=False)]; ByteLevel decoder / post-processor; BPE with no
unk token), trained on the demo questions / answers and the chat-template text, with the 14 Qwen special tokens
appended (same order as the real checkpoint, so their ids are the last ones of the vocabulary).

``train_tokenizer(texts, vocab_size)`` -> ``tokenizers.Tokenizer``;
``save_demo_tokenizer(out_dir, ...)`` -> dict of special ids (``image_token_id``, ``eos_token_id``, ...) for the
demo model config. Also runnable: ``python -m qwen2vl.demo.build_tokenizer OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from importlib import resources

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from . import data

PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_VOCAB_SIZE = 512  # BPE tokens incl. the 256 byte symbols; the 14 special tokens come on top
MODEL_MAX_LENGTH = 32768
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def chat_text(question: str, answer: str | None = None, *, image: bool = True,
              system: str | None = DEFAULT_SYSTEM) -> str:
    """The Qwen2-VL chat template rendered for one exchange (one ``<|image_pad|>`` placeholder per image, as
    the template writes it before the processor expands it). ``answer=None`` -> ends with the generation
    prompt ``<|im_start|>assistant\\n``."""
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    vision = "<|vision_start|><|image_pad|><|vision_end|>" if image else ""
    out += f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"
    if answer is not None:
        out += f"{answer}<|im_end|>\n"
    return out


def demo_corpus(n: int = 4000, seed: int = 1234) -> list[str]:
    """Training texts: chat-rendered demo exchanges covering every question kind and answer form."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        ex = data.make_example(rng, draw=False, text_only_prob=0.05, video_prob=0.2)
        texts.append(chat_text(ex["question"], ex["answer"], image=ex["meta"]["kind"] != "text_only"))
    # make sure every number / word form exists even if the sample missed it
    texts += [f"There are {k} shapes. There is {k} circle." for k in range(10)]
    texts += [" ".join(data.SHAPES + data.COLOR_NAMES + ("nothing",))] * 8  # whole-word tokens (demo.align)
    texts += [q + " " + a for q, a in data.TEXT_ONLY_QA]
    return texts


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def train_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (special tokens inside them are cut out before training), then append
    SPECIAL_TOKENS as special added tokens. ``vocab_size`` counts the BPE part (>= 256 byte symbols); the
    trainer may stop earlier when no pair occurs ``min_frequency`` times. Deterministic for the same input."""
    if vocab_size < 257:
        raise ValueError("vocab_size must exceed the 256 byte symbols")
    tok = _new_tokenizer()
    pieces = [p for t in texts for p in _SPECIAL_RE.split(t) if p]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                       single_word=False) for t in SPECIAL_TOKENS])
    return tok


def special_token_ids(tok: Tokenizer) -> dict:
    """Ids for the model / generation config."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "bos_token_id": ids["<|endoftext|>"],  # as in the real config.json (the tokenizer itself has no bos)
        "eos_token_id": ids["<|im_end|>"],
        "eos_token_ids": [ids["<|im_end|>"], ids["<|endoftext|>"]],  # generation_config eos list
        "pad_token_id": ids["<|endoftext|>"],
        "im_start_token_id": ids["<|im_start|>"],
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        # embedding rows for the model config: the vocabulary rounded up to a multiple of 64
        "model_vocab_size": -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64,
    }


def chat_template() -> str:
    """The Qwen2-VL chat template (vendored copy in qwen2vl/demo/assets, see NOTICE there)."""
    text = resources.files("qwen2vl.demo").joinpath("assets/chat_template.json").read_text(encoding="utf-8")
    return json.loads(text)["chat_template"]


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "padding_side": "left",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_tokenizer(tok: Tokenizer, out_dir: str) -> dict:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and chat_template.json."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok), f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "chat_template.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": chat_template()}, f, indent=4, ensure_ascii=False)
    return special_token_ids(tok)


def build_demo_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, n_texts: int = 4000, seed: int = 1234) -> Tokenizer:
    return train_tokenizer(demo_corpus(n_texts, seed), vocab_size)


def save_demo_tokenizer(out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE, n_texts: int = 4000,
                        seed: int = 1234) -> dict:
    """Train the demo tokenizer and write it to ``out_dir``; returns ``special_token_ids``."""
    return save_tokenizer(build_demo_tokenizer(vocab_size, n_texts, seed), out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m qwen2vl.demo.build_tokenizer OUT_DIR")
    print(json.dumps(save_demo_tokenizer(sys.argv[1]), indent=2))
