"""Deterministic synthetic VQA data for the bundled demo model: pictures (``scenes``), questions (``questions``)
and short clips (``video``), with one-sentence answers fully determined by the picture and the question.

An example is ``dict(image=PIL.Image | None, video=(F, H, W, 3) uint8 | None, question, answer, meta)``;
``meta = {"kind", "arg", "scene" | "clip"}`` describes it completely (``render(meta)`` / ``render_video(meta)``
redraw it). ``make_example(rng)`` / ``make_dataset(n, seed)`` / ``write_jsonl`` / ``read_jsonl``.

``same_meaning(pred, gold)`` is the metric: the two sentences name the same shapes, colours, counts, positions,
directions and yes/no (so "There are 3 shapes." and "I count 3 shapes." agree, "The circle is red." and
"The circle is blue." do not).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Iterable

from PIL import Image

from . import questions as qs
from . import video as vid
from .questions import IMAGE_KINDS, TEXT_ONLY_QA
from .scenes import COLOR_NAMES, SHAPE_PLURALS, SHAPES, render as render_scene, sample_scene
from .video import VIDEO_KINDS, render_clip, sample_clip

QUESTION_KINDS = IMAGE_KINDS + VIDEO_KINDS + ("text_only",)

# ----------------------------------------------------------------------------------------------- metric
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "no": "no", "none": "0", "nothing": "nothing"}
_KEYS = ({**{s: s for s in SHAPES}, **{p: s for s, p in SHAPE_PLURALS.items()}, **{c: c for c in COLOR_NAMES},
          **_NUMBER_WORDS, "yes": "yes", "colour": None,
          **{w: w for w in ("top", "bottom", "left", "right", "center", "middle", "up", "down")}})


def meaning(text: str) -> list[str]:
    """The content words of an answer in order: shapes (singular), colours, numbers, yes/no/nothing,
    positions and directions."""
    out = []
    for w in re.findall(r"[a-z]+|\d+", text.lower()):
        key = w if w.isdigit() else _KEYS.get(w)
        if key:
            out.append(key)
    return out


def same_meaning(pred: str, gold: str, ordered: bool = False) -> bool:
    """Same content words (as a multiset; in order when ``ordered``, e.g. "from red to blue")."""
    a, b = meaning(pred), meaning(gold)
    return a == b if ordered else sorted(a) == sorted(b)


def answer_is_correct(pred: str, gold: str, kind: str | None = None) -> bool:
    return same_meaning(pred, gold, ordered=kind in ("recolor", "describe_video"))


# ----------------------------------------------------------------------------------------------- examples
def render(meta: dict) -> Image.Image | None:
    """The picture of an image example (None for text-only and video examples)."""
    return render_scene(meta["scene"]) if meta.get("scene") else None


def render_video(meta: dict):
    return render_clip(meta["clip"]) if meta.get("clip") else None


def make_example(rng: random.Random, *, video_prob: float = 0.0, text_only_prob: float = 0.0,
                 kinds: Iterable[str] | None = None, draw: bool = True, phrasings: dict | None = None) -> dict:
    """One example. ``kinds`` restricts the question kinds; ``video_prob`` / ``text_only_prob`` are the shares of
    video / text-only examples (when their kinds are allowed); ``draw=False`` skips rendering (the random stream,
    hence every later example, is the same); ``phrasings`` replaces the training phrasings of image questions."""
    allowed = set(QUESTION_KINDS if kinds is None else kinds)
    unknown = allowed - set(QUESTION_KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}")
    image_ok, video_ok = allowed & set(IMAGE_KINDS), allowed & set(VIDEO_KINDS)
    u = rng.random()
    if "text_only" in allowed and (u < text_only_prob or not (image_ok or video_ok)):
        arg = rng.randrange(len(TEXT_ONLY_QA))
        q, a = TEXT_ONLY_QA[arg]
        return {"image": None, "video": None, "question": q, "answer": a,
                "meta": {"kind": "text_only", "arg": arg, "scene": None, "clip": None}}
    if video_ok and (not image_ok or u < text_only_prob + video_prob):
        events = [e for e, ks in vid.EVENT_KINDS.items() if set(ks) & video_ok]
        clip = sample_clip(rng, rng.choice(events))
        kind = rng.choice([k for k in vid.EVENT_KINDS[clip["event"]] if k in video_ok])
        q, a = vid.ask_video(rng, kind, clip)
        meta = {"kind": kind, "arg": None, "scene": None, "clip": clip}
        return {"image": None, "video": render_clip(clip) if draw else None, "question": q, "answer": a,
                "meta": meta}
    while True:
        scene = sample_scene(rng)
        options = [k for k in qs.applicable_kinds(scene) if k in image_ok]
        if options:
            break
    kind = rng.choices(options, [qs.KIND_WEIGHTS.get(k, 1.0) for k in options])[0]
    q, a, arg = qs.ask(rng, kind, scene, phrasings)
    meta = {"kind": kind, "arg": arg, "scene": scene, "clip": None}
    return {"image": render_scene(scene) if draw else None, "video": None, "question": q, "answer": a,
            "meta": meta}


def make_dataset(n: int, seed: int, **kwargs) -> list[dict]:
    """``n`` examples from ``random.Random(seed)``; same (n, seed, kwargs) -> identical examples."""
    rng = random.Random(seed)
    return [make_example(rng, **kwargs) for _ in range(n)]


def to_messages(question: str, answer: str | None, image_ref=None, video_ref=None) -> list[dict]:
    """Conversation in the processor's message format; no media ref -> text-only user turn."""
    content = [{"type": "image", "image": image_ref}] if image_ref is not None else []
    if video_ref is not None:
        content.append({"type": "video", "video": video_ref})
    content.append({"type": "text", "text": question})
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def example_messages(ex: dict, with_answer: bool = True) -> list[dict]:
    return to_messages(ex["question"], ex["answer"] if with_answer else None, ex["image"], ex.get("video"))


def write_jsonl(path: str, n: int, seed: int, *, image_dir: str = "images", **kwargs) -> str:
    """Write ``n`` examples: PNGs under ``<dirname(path)>/<image_dir>/`` (a video as a list of frame PNGs) and one
    JSON line per example: ``{"messages": [...], "meta": {...}}``, media paths relative to the JSONL file."""
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(make_dataset(n, seed, **kwargs)):
            image_ref = video_ref = None
            if ex["image"] is not None:
                image_ref = f"{image_dir}/{i:06d}.png"
                ex["image"].save(os.path.join(root, image_ref), format="PNG")
            if ex["video"] is not None:
                video_ref = []
                for j, frame in enumerate(ex["video"]):
                    video_ref.append(f"{image_dir}/{i:06d}_{j:02d}.png")
                    Image.fromarray(frame).save(os.path.join(root, video_ref[-1]), format="PNG")
            rec = {"messages": to_messages(ex["question"], ex["answer"], image_ref, video_ref), "meta": ex["meta"]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str, *, load_images: bool = False) -> list[dict]:
    """Read a file written by ``write_jsonl``: ``dict(image, video, question, answer, meta, messages)`` per line,
    ``image`` an absolute path (a loaded RGB PIL image when ``load_images``), ``video`` a list of frame paths."""
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            user, assistant = rec["messages"][0]["content"], rec["messages"][1]["content"]
            image = next((c["image"] for c in user if c["type"] == "image"), None)
            video = next((c["video"] for c in user if c["type"] == "video"), None)
            if image is not None:
                image = os.path.join(root, image)
                if load_images:
                    with Image.open(image) as im:
                        image = im.convert("RGB")
            if video is not None:
                video = [os.path.join(root, v) for v in video]
            question = next(c["text"] for c in user if c["type"] == "text")
            out.append({"image": image, "video": video, "question": question,
                        "answer": assistant[0]["text"], "meta": rec.get("meta"), "messages": rec["messages"]})
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qwen2vl.demo.data",
                                description="Write synthetic shapes conversations as a training JSONL + PNGs.")
    p.add_argument("--out", required=True, help="JSONL path; pictures go to <its folder>/images/")
    p.add_argument("-n", type=int, default=1000, help="number of conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-prob", type=float, default=0.0, help="share of video examples")
    a = p.parse_args(argv)
    print(write_jsonl(a.out, a.n, a.seed, video_prob=a.video_prob))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
