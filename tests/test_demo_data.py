"""Synthetic demo data (qwen2vl.demo: scenes, questions, video, data) and the demo tokenizer (build_tokenizer)."""
import collections
import io
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.demo import build_tokenizer as bt
from qwen2vl.demo import data, questions, scenes, video
from qwen2vl.demo.align import (AlignCollator, centre_flags, clip_scenes, region_targets, region_words,
                               token_targets)
from qwen2vl.demo.train_demo import DemoDataset, write_configs
from qwen2vl.processing.processor import Qwen2VLProcessor
from qwen2vl.training.data import SFTCollator

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen2-vl", "Qwen2-VL-2B-Instruct")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset():
    return data.make_dataset(400, seed=0, text_only_prob=0.03, video_prob=0.2)


@pytest.fixture(scope="module")
def tok():
    return bt.build_demo_tokenizer()


# ----------------------------------------------------------------------------------------------- data
def test_deterministic():
    a, b = data.make_dataset(25, seed=7, video_prob=0.3), data.make_dataset(25, seed=7, video_prob=0.3)
    for x, y in zip(a, b):
        assert (x["question"], x["answer"], x["meta"]) == (y["question"], y["answer"], y["meta"])
        if x["image"] is not None:
            assert _png(x["image"]) == _png(y["image"])
        else:
            assert np.array_equal(x["video"], y["video"])
    c = data.make_dataset(25, seed=8)
    assert [x["answer"] for x in a] != [x["answer"] for x in c]


def test_draw_false_same_stream():
    a = data.make_dataset(40, seed=3, video_prob=0.2)
    b = data.make_dataset(40, seed=3, video_prob=0.2, draw=False)
    assert [(x["question"], x["answer"], x["meta"]) for x in a] == [(x["question"], x["answer"], x["meta"]) for x in b]
    assert all(x["image"] is None and x["video"] is None for x in b)
    i = next(i for i, x in enumerate(a) if x["image"] is not None)
    assert _png(data.render(a[i]["meta"])) == _png(a[i]["image"])


def test_variety(dataset):
    kinds = collections.Counter(ex["meta"]["kind"] for ex in dataset)
    assert set(kinds) == set(data.QUESTION_KINDS), kinds
    pics = [ex for ex in dataset if ex["image"] is not None]
    sizes = {ex["image"].size for ex in pics}
    assert len(sizes) > 100 and min(min(s) for s in sizes) >= 56 and max(max(s) for s in sizes) <= 448
    assert any(w >= 2 * h for w, h in sizes) and any(h >= 2 * w for w, h in sizes)
    counts = collections.Counter(len(ex["meta"]["scene"]["shapes"]) for ex in pics)
    assert set(counts) == set(range(1, 7)), counts
    shapes = [s for ex in pics for s in ex["meta"]["scene"]["shapes"]]
    assert {s["outline"] > 0 for s in shapes} == {True, False}
    assert {ex["meta"]["scene"]["noise"] > 0 for ex in pics} == {True, False}
    assert {ex["meta"]["scene"]["aa"] for ex in pics} == {True, False}
    for kind in ("color", "count_all", "describe", "where"):
        assert len({ex["question"] for ex in dataset if ex["meta"]["kind"] == kind}) >= 4, kind
    for ex in dataset:  # full sentences
        assert (ex["answer"][:1].isupper() or ex["answer"][:1].isdigit()) and ex["answer"].endswith(".")
        assert len(ex["answer"].split()) >= 2


def test_answers_follow_the_scene(dataset):
    for ex in dataset:
        kind, scene, arg, ans = ex["meta"]["kind"], ex["meta"]["scene"], ex["meta"]["arg"], ex["answer"]
        if scene is None:
            continue
        sh = scene["shapes"]
        if kind == "count_all":
            n = len(sh)
            assert ans == (f"There are {n} shapes." if n > 1 else "There is 1 shape.")
        elif kind == "count_shape":
            assert data.meaning(ans) in ([str(sum(s["shape"] == arg for s in sh)), arg], ["no", arg])
        elif kind == "exists":
            assert ans.startswith("Yes") == any([s["color"], s["shape"]] == arg for s in sh)
        elif kind == "describe":
            assert sorted(data.meaning(ans)) == sorted(
                ([str(len(sh))] if len(sh) > 1 else []) + [w for s in sh for w in (s["color"], s["shape"])])
        elif kind == "shape":
            big = max(sh, key=scenes.area)
            assert big["shape"] in ans and all(scenes.area(s) * 1.5 <= scenes.area(big) for s in sh if s is not big)


def test_regions():
    s = {"shape": "circle", "center": [10, 90], "extent": 10}
    assert scenes.region(s, (100, 100)) == ("bottom", "left")
    assert scenes.region({**s, "center": [50, 50]}, (100, 100)) == ("middle", "center")
    assert scenes.region({**s, "center": [35, 50]}, (100, 100)) is None  # on a third-line: never asked
    scene = {"size": [300, 100], "shapes": [{"shape": "square", "color": "red", "center": [250, 20], "extent": 20}]}
    assert questions.answer("where", scene, "the square") == "The square is in the top right."
    assert questions.answer("what_at", scene, ["top", "right"]) == "There is a red square in the top right."
    assert questions.answer("what_at", scene, ["middle", "center"]) == "There is nothing in the center."


def test_pixels_match_the_scene():
    rng = random.Random(5)
    for _ in range(30):
        scene = scenes.sample_scene(rng)
        img = np.asarray(scenes.render({**scene, "noise": 0}), dtype=int)
        for s in scene["shapes"]:
            if s["outline"] == 0 and s["extent"] >= 12:
                x, y = (round(v) for v in s["center"])
                y = min(y + round(s["extent"] * 0.15), img.shape[0] - 1) if s["shape"] == "triangle" else y
                assert np.abs(img[y, x] - s["rgb"]).max() <= 12, (s, img[y, x])
        assert (img[0, 0] == scene["background"]).all() or any(scenes.contains(s, 0.5, 0.5) for s in scene["shapes"])


@pytest.mark.parametrize("event", ["move", "appear", "recolor"])
def test_clips_show_their_event(event):
    from qwen2vl.processing.video_processing import sample_frame_indices

    rng = random.Random(11)
    for _ in range(10):
        clip = video.sample_clip(rng, event)
        frames = video.render_clip({**clip, "noise": 0}).astype(int)
        idx = sample_frame_indices(len(frames), num_frames=video.SAMPLED_FRAMES)
        ink = [np.abs(frames[i] - clip["background"]).sum(-1) > 60 for i in idx]
        if event == "move":
            ys, xs = zip(*[np.nonzero(m) for m in (ink[0], ink[-1])])
            dx, dy = xs[1].mean() - xs[0].mean(), ys[1].mean() - ys[0].mean()
            moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[clip["direction"]]
            assert moved > 0.2 * clip["size"][0 if clip["direction"] in ("left", "right") else 1]
        elif event == "appear":
            assert not ink[0].any() and not ink[1].any() and ink[2].any() and ink[3].any()
        else:
            c0, c1 = (frames[i][ink[k]].mean(0) for k, i in ((0, idx[0]), (3, idx[3])))
            assert np.abs(c0 - clip["rgb"]).max() < 15 and np.abs(c1 - clip["rgb2"]).max() < 15
        q, a = video.ask_video(rng, event, clip)
        assert clip["shape"] in a or clip["shape"] in q


def test_meaning_metric():
    assert data.answer_is_correct("There are 3 shapes.", "I count three shapes.")
    assert not data.answer_is_correct("There are 2 shapes.", "There are 3 shapes.")
    assert not data.answer_is_correct("The circle is blue.", "The circle is red.")
    assert data.answer_is_correct("The circle moves left.", "The circle moves to the left.", "move")
    assert not data.answer_is_correct("The square turns from blue to red.", "The square turns from red to blue.",
                                      "recolor")
    assert not data.answer_is_correct("There is a red square in the top right.",
                                      "There is a red square in the top left.")


def test_alignment_targets():
    scene = {"size": [112, 56], "shapes": [{"shape": "circle", "color": "red", "center": [20, 28], "extent": 30,
                                            "outline": 0}]}
    assert token_targets(scene, (1, 2)) == [("red", "circle"), ("nothing", None)]
    assert token_targets(scene, (2, 4))[4] == ("red", "circle")  # the token under a small shape's centre
    assert centre_flags(scene, (2, 4)) == [False, False, False, False, True, False, False, False]  # (20, 28): row 1
    assert region_words((3, 3))[0] == ("top", "left") and region_words((3, 3))[5] == ("center", "right")
    assert [r for r, _ in region_words((6, 1))] == ["top", "top", "center", "center", "bottom", "bottom"]


def test_region_targets_name_the_shapes_region_at_all_its_tokens():
    # a 300x150 canvas seen as 4 x 8 tokens of 37.5 px: a square in the top left third covering tokens 0, 1, 8, 9;
    # a small circle at (250, 120): bottom right; a triangle whose centre x sits on the 2/3 line: no clear region
    shapes = [{"shape": "square", "color": "red", "center": [45, 35], "extent": 70, "outline": 0},
              {"shape": "circle", "color": "blue", "center": [250, 120], "extent": 20, "outline": 0},
              {"shape": "triangle", "color": "green", "center": [200, 30], "extent": 20, "outline": 0}]
    scene = {"size": [300, 150], "shapes": shapes}
    got = region_targets(scene, (4, 8))
    assert got[0] == got[1] == got[8] == got[9] == ("top", "left")  # every token of the square
    assert got[30] == ("bottom", "right") and got[5] is None  # the triangle's region is ambiguous
    assert got[3] is None and got[20] is None  # background
    shapes[0]["center"] = [150, 75]  # moved to the middle: "in the center" -> the pair (center, center)
    assert region_targets(scene, (4, 8))[11] == ("center", "center")
    shapes[0]["center"] = [150, 30]  # "at the top" -> (top, top)
    assert region_targets(scene, (4, 8))[3] == ("top", "top")


def test_clip_alignment_follows_the_sampled_frames():
    clip = video.sample_clip(random.Random(3), "move")
    first, second = clip_scenes(clip, 2)
    axis = 0 if clip["direction"] in ("left", "right") else 1
    step = second["shapes"][0]["center"][axis] - first["shapes"][0]["center"][axis]
    assert (step > 0) == (clip["direction"] in ("right", "down")) and abs(step) > 1
    appear = video.sample_clip(random.Random(4), "appear")
    before, after = clip_scenes(appear, 2)
    assert not before["shapes"] and len(after["shapes"]) == 1  # the change falls between the two temporal patches


def test_align_collator_labels_every_vision_token():
    with tempfile.TemporaryDirectory() as d:
        write_configs(Path(d))
        processor = Qwen2VLProcessor.from_pretrained(d)
    ds = DemoDataset(12, seed=5, max_turns=2, min_turns=2, video_prob=0.5)
    records = [ds[i] for i in range(len(ds))]
    word = processor.tokenizer.convert_tokens_to_ids
    plain = AlignCollator(SFTCollator(processor))(records)  # the bundled recipe: image tokens, colour + shape
    ids = plain["input_ids"]
    n_image, n_video = int((ids == processor.image_token_id).sum()), int((ids == processor.video_token_id).sum())
    assert n_image and n_video
    assert plain["aux_labels"].shape == (n_image, 2) and plain["pos_labels"].shape == (n_image, 2)
    full = AlignCollator(SFTCollator(processor), centre=True, video=True)(records)
    assert full["aux_labels"].shape == (n_image + n_video, 3) and full["pos_labels"].shape == (n_image + n_video, 2)
    assert torch.equal(full["aux_labels"][:n_image, :2], plain["aux_labels"])
    assert set(full["aux_labels"][:, 2].tolist()) == {word("1"), word("\u0120no")}
    assert set(full["pos_labels"][:, 0].tolist()) == {word("\u0120" + w) for w in ("top", "center", "bottom")}
    placed = AlignCollator(SFTCollator(processor), centre=True, video=True, region=True)(records)["aux_labels"]
    assert placed.shape == (n_image + n_video, 5) and torch.equal(placed[:, :3], full["aux_labels"])
    on_shape = placed[:, 1] >= 0
    assert ((placed[:, 3] >= 0) <= on_shape).all() and (placed[on_shape, 3] >= 0).float().mean() > 0.3
    assert set(placed[placed[:, 3] >= 0, 3:].flatten().tolist()) <= {
        word("\u0120" + w) for w in ("top", "center", "bottom", "left", "right")}
    # motion: only the shape's tokens in the later temporal patch of a "move" clip, labelled with its direction
    motion, grids = full["motion_labels"], full["video_grid_thw"].tolist()
    assert motion.shape == (n_video,)
    clips = [r["meta"]["clip"] for r in records if r["meta"]["clip"]]
    start, moving = 0, 0
    for clip, (t, gh, gw) in zip(clips, grids):
        n = t * gh * gw // 4
        part, start = motion[start:start + n], start + n
        assert (part[:n // t] == -100).all()  # never in the first temporal patch
        if clip["event"] == "move":
            moving += 1
            assert set(part[part >= 0].tolist()) == {word("\u0120" + clip["direction"])}
        else:
            assert (part == -100).all()
    assert moving


def test_bucketed_batches_and_vision_token_counts():
    from qwen2vl.demo.train_demo import bucketed_batches

    with tempfile.TemporaryDirectory() as d:
        write_configs(Path(d), (12544, 28224, 12544))
        processor = Qwen2VLProcessor.from_pretrained(d)
    ds = DemoDataset(24, seed=6, video_prob=0.3)
    counts = ds.vision_tokens((12544, 28224), (56 * 56, 12544))  # without rendering
    ids = SFTCollator(processor)([ds[i] for i in range(len(ds))])["input_ids"]
    assert sum(counts) == int((ids == processor.image_token_id).sum() + (ids == processor.video_token_id).sum())
    lengths = list(range(100, 0, -1))
    batches = bucketed_batches(lengths, 5, seed=0, pool=4)
    assert batches == bucketed_batches(lengths, 5, seed=0, pool=4) != bucketed_batches(lengths, 5, seed=1, pool=4)
    assert sorted(i for b in batches for i in b) == list(range(100)) and all(len(b) == 5 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30  # ~20 (5 neighbours of 20 random draws from 100), against ~65 for random batches of 5


def test_jsonl(tmp_path):
    path = data.write_jsonl(str(tmp_path / "train.jsonl"), 20, seed=11, text_only_prob=0.2, video_prob=0.2)
    ref = data.make_dataset(20, seed=11, text_only_prob=0.2, video_prob=0.2)
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 20
    for i, (line, ex) in enumerate(zip(lines, ref)):
        user, assistant = json.loads(line)["messages"]
        assert assistant["content"] == [{"type": "text", "text": ex["answer"]}]
        assert user["content"][-1] == {"type": "text", "text": ex["question"]}
        if ex["image"] is not None:
            assert user["content"][0] == {"type": "image", "image": f"images/{i:06d}.png"}
            with Image.open(tmp_path / "images" / f"{i:06d}.png") as im:
                assert im.convert("RGB").tobytes() == ex["image"].tobytes()
        elif ex["video"] is not None:
            assert user["content"][0]["video"][0] == f"images/{i:06d}_00.png"
            assert len(user["content"][0]["video"]) == len(ex["video"])
        else:
            assert len(user["content"]) == 1
    back = data.read_jsonl(path, load_images=True)
    assert [(b["question"], b["answer"]) for b in back] == [(e["question"], e["answer"]) for e in ref]
    assert all((b["video"] is None) == (e["video"] is None) for b, e in zip(back, ref))


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
    short = [ex for ex in dataset if ex["meta"]["kind"] not in ("describe", "describe_video")]
    assert max(len(tok.encode(ex["answer"]).ids) for ex in short) <= 14
    assert max(len(tok.encode(ex["answer"]).ids) for ex in dataset) <= 48  # "6 shapes: a red circle, ..."
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


def test_vision_stage_trains_only_the_vision_tower():
    from qwen2vl.demo.train_demo import demo_config
    from qwen2vl.demo.vision_stage import train_vision
    from qwen2vl.model import Qwen2VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as d:
        ids = write_configs(Path(d), (12544, 12544, 12544))
        processor = Qwen2VLProcessor.from_pretrained(d)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(demo_config(ids, hidden=64, layers=1, intermediate=128, vision_depth=1,
                                                        vision_dim=32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    collator = AlignCollator(SFTCollator(processor), centre=True, region=True)
    pictures = DemoDataset(4, seed=5, video_prob=0.0, text_only_prob=0.0)
    with pytest.raises(ValueError, match="4 items for 3 steps"):
        train_vision(model, collator, pictures, steps=3, batch_size=2, lr=1e-2)
    train_vision(model, collator, pictures, steps=2, batch_size=2, lr=1e-2, warmup=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    vision = {n for n, _ in model.named_parameters() if n.startswith("model.visual.")}
    assert changed and changed <= vision  # the tied embeddings / LM head stay as the decoder will first see them
    assert len(changed & vision) > len(vision) // 2  # the tower itself learns, not only the head
    from qwen2vl.demo.vision_stage import stage_lr

    assert stage_lr(0, 100, 1.0, 10, 0.05) == 0.1 and stage_lr(10, 100, 1.0, 10, 0.05) == 1.0  # warmup, then peak
    assert abs(stage_lr(99, 100, 1.0, 10, 0.05) - 0.05) < 1e-9 and 0.05 < stage_lr(60, 100, 1.0, 10, 0.05) < 1
    assert stage_lr(99, 100, 1.0, 10, 1.0) == 1.0  # ratio 1: constant after warmup (the earlier recipe)
