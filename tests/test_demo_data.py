"""Synthetic demo data (qwen2vl.demo.data) and the demo tokenizer (qwen2vl.demo.build_tokenizer)."""
import collections
import io
import json
import os

import pytest
from PIL import Image

from qwen2vl.demo import build_tokenizer as bt
from qwen2vl.demo import data

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen2-vl", "Qwen2-VL-2B-Instruct")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset():
    return data.make_dataset(400, seed=0, text_only_prob=0.05)


@pytest.fixture(scope="module")
def tok():
    return bt.build_demo_tokenizer()


# ----------------------------------------------------------------------------------------------- data
def test_deterministic():
    a, b = data.make_dataset(25, seed=7), data.make_dataset(25, seed=7)
    for x, y in zip(a, b):
        assert (x["question"], x["answer"], x["meta"]) == (y["question"], y["answer"], y["meta"])
        assert _png(x["image"]) == _png(y["image"])
    c = data.make_dataset(25, seed=8)
    assert [x["answer"] for x in a] != [x["answer"] for x in c]


def test_draw_false_same_stream():
    a = data.make_dataset(40, seed=3)
    b = data.make_dataset(40, seed=3, draw=False)
    def key(x):
        return x["question"], x["answer"], x["meta"]
    assert [key(x) for x in a] == [key(x) for x in b]
    assert all(x["image"] is None for x in b)
    assert _png(data.render(a[5]["meta"])) == _png(a[5]["image"])


def test_images_and_sentences(dataset):
    for ex in dataset:
        if ex["meta"]["kind"] != "text_only":
            assert ex["image"].mode == "RGB" and ex["image"].size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
        assert ex["question"].endswith(("?", "."))
        assert ex["answer"].endswith(".") and len(ex["answer"].split()) >= 3, ex["answer"]
        assert ex["answer"][0].isupper()
    assert data.IMAGE_SIZE % 28 == 0
    with pytest.raises(ValueError):
        data.make_example(__import__("random").Random(0), size=100)


def test_all_kinds_appear(dataset):
    counts = collections.Counter(ex["meta"]["kind"] for ex in dataset)
    assert set(counts) == set(data.QUESTION_KINDS), counts
    assert "text_only" not in {ex["meta"]["kind"] for ex in data.make_dataset(200, seed=1)}  # off by default
    for kinds in (["color_of"], ["read_word"], ["describe"], ["text_only"], ["exists", "shape_at"]):
        assert {ex["meta"]["kind"] for ex in data.make_dataset(30, seed=2, kinds=kinds)} <= set(kinds)


def test_exists_balanced():
    exists = [ex["answer"].startswith("Yes") for ex in data.make_dataset(300, 4, kinds=["exists"])]
    assert 0.35 < sum(exists) / len(exists) < 0.65


def _n(answer):
    word = answer.split()[2]
    return 0 if word == "no" else int(word)


def test_answers_match_meta(dataset):
    for ex in dataset:
        m, q, a = ex["meta"], ex["question"], ex["answer"]
        shapes, kind, arg = m["shapes"], m["kind"], m["arg"]
        if kind == "count_all":
            assert _n(a) == len(shapes) and 1 <= len(shapes) <= 4
            assert a == ("There is 1 shape." if len(shapes) == 1 else f"There are {len(shapes)} shapes.")
        elif kind == "count_shape":
            assert _n(a) == sum(s["shape"] == arg for s in shapes) and arg in q
        elif kind == "count_color":
            assert _n(a) == sum(s["color"] == arg for s in shapes) and arg in q
        elif kind == "color_of":
            (s,) = [s for s in shapes if s["shape"] == arg]
            assert a == f"The {arg} is {s['color']}."
        elif kind == "shape_at":
            here = [s for s in shapes if s["quadrant"] == arg]
            assert (a.startswith("There is nothing") == (not here)) and arg in a
        elif kind == "exists":
            present = any([s["color"], s["shape"]] == arg for s in shapes)
            assert a.startswith("Yes") == present
        elif kind in ("describe", "read_word") and m["word"]:
            assert m["word"] in data.WORDS and a.endswith(f"{m['word']}.") and not shapes
        elif kind == "describe":
            assert len(shapes) == 1 and a == f"A {shapes[0]['color']} {shapes[0]['shape']}."
        else:
            assert kind == "text_only" and ex["image"] is None and (q, a) in data.TEXT_ONLY_QA


def test_pixels_match_meta(dataset):
    """Each shape's centre has its palette colour, each shape stays inside its own quadrant, empty quadrants
    are plain background."""
    half = data.IMAGE_SIZE // 2
    for ex in dataset[:150]:
        if ex["image"] is None or ex["meta"]["word"]:
            continue
        px = ex["image"].load()
        used = set()
        for s in ex["meta"]["shapes"]:
            cx, cy = s["center"]
            got = px[cx, cy]
            nearest = min(data.COLORS, key=lambda c: sum((u - v) ** 2 for u, v in zip(data.COLORS[c], got)))
            assert nearest == s["color"]
            q = data.QUADRANTS.index(s["quadrant"])
            x0, y0, r = (q % 2) * half, (q // 2) * half, s["extent"] / 2
            assert x0 <= cx - r and cx + r < x0 + half and y0 <= cy - r and cy + r < y0 + half
            assert s["extent"] >= 24
            used.add(q)
        for q in set(range(4)) - used:
            x0, y0 = (q % 2) * half, (q // 2) * half
            crop = ex["image"].crop((x0, y0, x0 + half, y0 + half))
            assert len(crop.getcolors()) == 1


def test_word_images_have_ink():
    for ex in data.make_dataset(10, seed=5, kinds=["read_word"]):
        colors = ex["image"].getcolors()
        assert len(colors) == 2 and min(c for c, _ in colors) > 300  # background + ink, enough ink to read


def test_answer_is_correct():
    assert data.answer_is_correct(" There is 1 shape.\n", "There is 1 shape.")
    assert not data.answer_is_correct("There is 1 shape", "There is 1 shape.")
    assert not data.answer_is_correct("There are 2 shapes.", "There is 1 shape.")


def test_jsonl(tmp_path):
    path = data.write_jsonl(str(tmp_path / "train.jsonl"), 20, seed=11, text_only_prob=0.2)
    ref = data.make_dataset(20, seed=11, text_only_prob=0.2)
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 20
    for i, (line, ex) in enumerate(zip(lines, ref)):
        rec = json.loads(line)
        user, assistant = rec["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == [{"type": "text", "text": ex["answer"]}]
        assert user["content"][-1] == {"type": "text", "text": ex["question"]}
        if ex["image"] is None:
            assert len(user["content"]) == 1
            continue
        item = user["content"][0]
        assert item == {"type": "image", "image": f"images/{i:06d}.png"}
        with Image.open(tmp_path / item["image"]) as im:
            assert im.convert("RGB").tobytes() == ex["image"].tobytes()
    back = data.read_jsonl(path, load_images=True)
    assert [(b["question"], b["answer"]) for b in back] == [(e["question"], e["answer"]) for e in ref]
    assert all((b["image"] is None) == (e["image"] is None) for b, e in zip(back, ref))
    again = tmp_path / "again"
    again.mkdir()
    data.write_jsonl(str(again / "train.jsonl"), 20, seed=11, text_only_prob=0.2)
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()
    assert (again / "images" / "000003.png").read_bytes() == (tmp_path / "images" / "000003.png").read_bytes()



def test_jsonl_command(tmp_path, capsys):
    assert data.main(["--out", str(tmp_path / "d.jsonl"), "-n", "5", "--seed", "11"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d.jsonl")
    back = data.read_jsonl(str(tmp_path / "d.jsonl"))
    assert [(b["question"], b["answer"]) for b in back] == \
        [(e["question"], e["answer"]) for e in data.make_dataset(5, seed=11)]

# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_deterministic(tok):
    assert bt.build_demo_tokenizer().to_str() == tok.to_str()


def test_special_tokens(tok):
    n = tok.get_vocab_size(with_added_tokens=True)
    ids = [tok.token_to_id(t) for t in bt.SPECIAL_TOKENS]
    assert ids == list(range(n - len(bt.SPECIAL_TOKENS), n))  # at the end, in the checkpoint's order
    for t in bt.SPECIAL_TOKENS:
        assert tok.encode(t).ids == [tok.token_to_id(t)]
        assert tok.encode(f"a{t}b").tokens[1] == t
    sp = bt.special_token_ids(tok)
    assert sp["image_token_id"] == tok.token_to_id("<|image_pad|>")
    assert sp["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert sp["pad_token_id"] == tok.token_to_id("<|endoftext|>")
    assert sp["model_vocab_size"] >= n and sp["model_vocab_size"] % 64 == 0


def test_roundtrip_and_lengths(tok, dataset):
    samples = ["Hello, wörld! 12345 ¿qué?  \n\n\tx ", "日本語 🙂",
               bt.chat_text("What is in the top left?", None)]
    samples += [ex["question"] for ex in dataset[:50]] + [ex["answer"] for ex in dataset[:50]]
    for s in samples:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    assert max(len(tok.encode(ex["answer"]).ids) for ex in dataset) <= 12
    assert tok.encode("There are 3 circles.").tokens == ["There", "Ġare", "Ġ", "3", "Ġcircles", "."]
    full = bt.chat_text("How many circles are there?", "There are 3 circles.")
    assert len(tok.encode(full).ids) <= 40  # + 15 once the image placeholder is expanded to 16 tokens
    assert 256 < tok.get_vocab_size() <= bt.DEFAULT_VOCAB_SIZE + len(bt.SPECIAL_TOKENS)


def test_vendored_chat_template():
    tpl = bt.chat_template()
    assert "<|vision_start|><|image_pad|><|vision_end|>" in tpl
    ref = os.path.join(SHARED, "chat_template.json")
    if os.path.exists(ref):
        with open(ref, encoding="utf-8") as f:
            assert json.load(f)["chat_template"] == tpl


def test_saved_tokenizer_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = bt.save_tokenizer(tok, str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "vocab.json", "merges.txt"):
        assert (tmp_path / name).exists()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["padding_side"] == "left"
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {
        tok.token_to_id(t): t for t in bt.SPECIAL_TOKENS}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == ids["eos_token_id"] and hf.pad_token_id == ids["pad_token_id"]
    assert len(hf) == tok.get_vocab_size(with_added_tokens=True)
    msgs = data.to_messages("How many circles are there?", "There are 3 circles.", "images/000001.png")
    rendered = hf.apply_chat_template(msgs, tokenize=False)
    assert rendered == bt.chat_text("How many circles are there?", "There are 3 circles.")
    prompt = hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == bt.chat_text("How many circles are there?", None)
    for s in (rendered, prompt, "Hello, wörld! 12345  \n\n x", "There is a red circle in the top left."):
        assert hf(s)["input_ids"] == tok.encode(s).ids
        assert hf.decode(tok.encode(s).ids) == s
