"""Qwen2TokenizerFast: parity with the transformers oracle on the real Qwen2-VL-2B vocab, loading paths, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen2vl.processing.tokenizer import AutoTokenizer, Qwen2TokenizerFast, resolve_pretrained_dir

CKPT = Path(__file__).resolve().parents[2] / "shared" / "qwen2-vl" / "Qwen2-VL-2B-Instruct"
if not CKPT.is_dir():
    CKPT = Path("/work/shared/qwen2-vl/Qwen2-VL-2B-Instruct")
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason="Qwen2-VL-2B metadata not available")

SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
            151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
            151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
            151655: "<|image_pad|>", 151656: "<|video_pad|>"}

CORPUS = [
    "Hello world! How are you today?", "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好，我们去公园散步吧。", "日本語のテキストと한국어 텍스트",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "emoji 😀🎉👨‍👩‍👧‍👦 and flags 🇫🇷 done", "   leading, internal    runs and trailing   ",
    "\n\n\n", "\t\t tab\tseparated\t", "12345678", "pi=3.14159265, year 2024, 1,000,000",
    "I'm sure you're right; they'll see. WE'D", "café naïve e\u0301 Ångström", "", " ", "a\r\nb\rc\n",
    "<|im_start|>user\nDescribe<|vision_start|><|image_pad|><|vision_end|> this.<|im_end|>\n",
    "text<|image_pad|><|video_pad|>more<|endoftext|>tail", "".join(SPECIALS.values()),
    "<|im_start|><|im_start|>  <|im_end|>\n\n", "not a special <|im_start and |im_end|>",
    "https://example.com/path?q=1&x=2 <b>html</b> {\"json\": [1, 2]}",
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(CKPT))


def test_special_tokens_and_config(tok):
    assert isinstance(tok, Qwen2TokenizerFast)
    for idx, content in SPECIALS.items():
        assert tok.convert_tokens_to_ids(content) == idx
        assert tok.convert_ids_to_tokens(idx) == content
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.padding_side == "left" and tok.model_max_length == 32768
    assert len(tok) == 151657 and tok.vocab_size == 151643
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=True)  # no BOS/EOS added


@pytest.mark.parametrize("text", CORPUS)
def test_encode_decode_parity(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.tokenize(text) == ref.tokenize(text)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_vocab_and_conversions_parity(tok, ref):
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.convert_ids_to_tokens([14990, 220, 151645]) == ref.convert_ids_to_tokens([14990, 220, 151645])
    assert tok.convert_tokens_to_ids(["Ġhello", "<|im_end|>", "no_such_tok"]) == ref.convert_tokens_to_ids(
        ["Ġhello", "<|im_end|>", "no_such_tok"])
    assert tok.special_tokens_map == ref.special_tokens_map
    assert sorted(tok.all_special_ids) == sorted(ref.all_special_ids)


def test_batch_decode_parity(tok, ref):
    batch = [ref.encode(t) for t in CORPUS[:6]]
    assert tok.batch_decode(batch) == ref.batch_decode(batch)
    assert tok.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)
    padded = torch.tensor([[151643, 151643, 14990], [9707, 11, 1879]])
    assert tok.batch_decode(padded, skip_special_tokens=True) == ref.batch_decode(padded, skip_special_tokens=True)
    assert tok.decode(padded) == ref.decode(padded)  # 2-D → list, as transformers 5.x
    assert tok.decode(torch.tensor(14990)) == tok.decode(14990) == "hello"
    # clean_up_tokenization_spaces is accepted and, like transformers 5.x for BPE, not destructive
    ids = ref.encode("hello , world . isn't")
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == "hello , world . isn't"


@pytest.mark.parametrize("kwargs", [
    {}, {"padding": True}, {"padding": "longest", "padding_side": "right"},
    {"padding": "max_length", "max_length": 12}, {"padding": True, "pad_to_multiple_of": 8},
    {"truncation": True, "max_length": 3}, {"max_length": 2},
    {"truncation": True, "max_length": 4, "padding": "max_length", "padding_side": "right"},
    {"padding": True, "return_tensors": "pt"}, {"padding": True, "return_tensors": "np"},
])
def test_call_parity(tok, ref, kwargs):
    texts = ["a b c d e f g", "hello", "你好 world <|im_end|>"]
    ours, theirs = tok(texts, **kwargs), ref(texts, **kwargs)
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs:
        a, b = ours[key], theirs[key]
        if kwargs.get("return_tensors") == "pt":
            assert a.dtype == b.dtype and torch.equal(a, b)
        elif kwargs.get("return_tensors") == "np":
            assert a.dtype == b.dtype and (a == b).all()
        else:
            assert a == b
    single, single_ref = tok("a b c", **kwargs), ref("a b c", **kwargs)
    for key in single_ref:
        a, b = single[key], single_ref[key]
        assert (a.tolist() if hasattr(a, "tolist") else a) == (b.tolist() if hasattr(b, "tolist") else b)


def test_truncation_side_and_encode_tensors(tok, ref):
    left = AutoTokenizer.from_pretrained(CKPT, truncation_side="left")
    assert left("a b c d", truncation=True, max_length=2)["input_ids"] == [272, 294]
    assert torch.equal(tok.encode("a b", return_tensors="pt"), ref.encode("a b", return_tensors="pt"))
    assert tok("a b", return_attention_mask=False).keys() == {"input_ids"}


def test_split_special_tokens(tok, ref):
    text = "<|im_start|>user<|image_pad|>"
    assert tok(text, split_special_tokens=True)["input_ids"] == ref(text, split_special_tokens=True)["input_ids"]
    assert 151655 not in tok(text, split_special_tokens=True)["input_ids"]
    assert tok(text)["input_ids"][0] == 151644  # the temporary switch is restored


def test_errors(tok):
    with pytest.raises(ValueError, match="Unable to create tensor"):
        tok(["a b c", "a"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a", "a b"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="text input must be"):
        tok(123)
    with pytest.raises(ValueError, match="truncation"):
        tok("a", truncation="only_second_please")


def test_save_roundtrip_and_oracle_reads_ours(tok, ref, tmp_path):
    files = {Path(f).name for f in tok.save_pretrained(tmp_path)}
    assert files == {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = CORPUS[4] + CORPUS[17] + CORPUS[2]
    assert again.encode(text) == tok.encode(text)
    assert (again.padding_side, again.eos_token, again.chat_template) == ("left", "<|im_end|>", tok.chat_template)
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.encode(text) == ref.encode(text) and reloaded.eos_token_id == 151645


def test_tokenizer_json_missing_vision_tokens_is_merged(tok, tmp_path):
    # Some Qwen2-VL repos ship a tokenizer.json without the vision tokens (REFERENCE §1.5): merge the config's.
    data = json.loads(tok.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 151652]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_bytes((CKPT / "tokenizer_config.json").read_bytes())
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("<|vision_start|><|image_pad|><|video_pad|>") == [151652, 151655, 151656]
    assert loaded.decode([151652, 9707], skip_special_tokens=True) == "Hello"


def test_added_token_with_id_gap(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "Ġ": 3}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    added = {"4": {"content": "<|endoftext|>", "special": True}, "10": {"content": "<|im_end|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")
    t = AutoTokenizer.from_pretrained(tmp_path)
    assert t.encode("ab<|im_end|>ab<|endoftext|>") == [2, 10, 2, 4]
    assert t.decode([2, 10, 0], skip_special_tokens=True) == "aba"


def test_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="neither"):
        AutoTokenizer.from_pretrained(tmp_path)  # empty directory
    with pytest.raises(ValueError, match="neither a checkpoint directory nor"):
        resolve_pretrained_dir("/definitely/not/here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"'someone/no-such-model'.*HF_HUB_OFFLINE"):
        AutoTokenizer.from_pretrained("someone/no-such-model")
