"""Streamers: incremental decoding never emits a broken multi-byte character, and the pieces add up to the
full decode (real Qwen2 byte-level BPE vocabulary from ../shared)."""
from pathlib import Path

import pytest

from qwen2vl.generation import TextIteratorStreamer, TextStreamer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "qwen2-vl" / "Qwen2-VL-2B-Instruct"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/qwen2-vl/Qwen2-VL-2B-Instruct")
TEXT = "你好，世界！🙂👍🏽 naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 café\n第二行：emoji 🤖🚀 和汉字 齉龘\n\nend 🧪"
_TOKENIZER = []


def load_tokenizer():
    """The project's tokenizer when available, else a `tokenizers` byte-level BPE over the same vocab."""
    if not _TOKENIZER:
        try:
            from qwen2vl.processing.tokenizer import Qwen2TokenizerFast

            tok = Qwen2TokenizerFast.from_pretrained(SHARED)
        except ImportError:
            from tokenizers import Tokenizer, decoders, pre_tokenizers
            from tokenizers.models import BPE

            tok = Tokenizer(BPE.from_file(str(SHARED / "vocab.json"), str(SHARED / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        _TOKENIZER.append(tok)
    return _TOKENIZER[0]


def encode(tok, text):
    ids = tok.encode(text)
    return ids if isinstance(ids, list) else ids.ids


class Collect(TextStreamer):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pieces, self.ended = [], 0

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ended += stream_end


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_multibyte_characters_are_never_split(tok):
    import torch

    ids = encode(tok, TEXT)
    assert tok.decode(ids) == TEXT
    assert any("\ufffd" in tok.decode([i]) for i in ids)      # some characters do span several tokens
    s = Collect(tok)
    for i in ids:
        s.put(torch.tensor([[i]]))
    s.end()
    assert s.ended == 1
    assert all("\ufffd" not in p for p in s.pieces)
    assert "".join(s.pieces) == TEXT
    assert len([p for p in s.pieces if p]) > 10               # incremental, not one chunk at the end


def test_skip_prompt_and_iterator(tok):
    import threading

    prompt, gen = encode(tok, "问：天气？\n"), encode(tok, "答：晴天☀️ then 🌧️.")
    s = TextIteratorStreamer(tok, skip_prompt=True, timeout=10)

    def produce():
        s.put([prompt])
        for i in gen:
            s.put([i])
        s.end()

    t = threading.Thread(target=produce)
    t.start()
    pieces = list(s)
    t.join()
    assert "".join(pieces) == tok.decode(gen)
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_character_is_flushed_at_end(tok):
    ids = encode(tok, "𝔘𝔫")
    assert len(ids) > 1
    s = Collect(tok)
    s.put(ids[:1])
    assert "".join(s.pieces) == ""                              # held back
    s.end()
    assert "".join(s.pieces) == tok.decode(ids[:1])             # flushed as-is at the end


def test_batch_streaming_rejected(tok):
    import torch

    with pytest.raises(ValueError, match="batch size 1"):
        TextStreamer(tok).put(torch.zeros(2, 3, dtype=torch.long))


def test_text_streamer_prints(tok, capsys):
    s = TextStreamer(tok, skip_prompt=False)
    for i in encode(tok, "hi 你好\nok"):
        s.put([i])
    s.end()
    assert capsys.readouterr().out == "hi 你好\nok\n"
