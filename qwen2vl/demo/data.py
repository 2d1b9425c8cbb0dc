"""Deterministic synthetic "shapes" VQA data for the bundled demo model.

Every example is one small picture (IMAGE_SIZE x IMAGE_SIZE RGB, a multiple of 28 so a 14-px patch ViT with a
2x2 merger sees (IMAGE_SIZE/28)**2 merged tokens: 16 for 112 px) plus one question and a one-sentence answer
that is fully determined by the picture and the question (so greedy exact match is a meaningful metric).

Pictures are of two sorts:
  * shape pictures: a plain light background and 1-4 shapes (circle / square / triangle, colours red / green /
    blue / yellow), at most one per quadrant of a 2x2 grid, never overlapping;
  * word pictures (probability ``word_prob``): one 3-letter word from WORDS drawn in big 5x7 block letters
    (a bitmap font defined here, so rendering does not depend on any font file).

Question kinds (QUESTION_KINDS), one fixed template each:
  count_all     "How many shapes are there?"            -> "There are 3 shapes." / "There is 1 shape."
  count_shape   "How many circles are there?"           -> "There are 2 circles." / "There is 1 circle." /
                                                           "There are no circles."
  count_color   "How many red shapes are there?"        -> "There are 2 red shapes." / "There is 1 red shape." /
                                                           "There are no red shapes."
  color_of      "What color is the circle?"             -> "The circle is red."  (only when exactly one circle)
  shape_at      "What is in the top left?"              -> "There is a blue square in the top left." /
                                                           "There is nothing in the top left."
  exists        "Is there a green triangle?"            -> "Yes, there is a green triangle." /
                                                           "No, there is no green triangle."  (50/50)
  describe      "Describe the image."                   -> "A red circle." (single-shape pictures) /
                                                           "The word CAT." (word pictures)
  read_word     "What word is written in the image?"    -> "The word is CAT."
  text_only     (no image; only when ``text_only_prob`` > 0) fixed facts, e.g.
                "What colors can the shapes have?"      -> "The shapes can be red, green, blue or yellow."

``make_example(rng)`` / ``make_dataset(n, seed)`` / ``write_jsonl(path, n, seed)`` / ``read_jsonl(path)``.
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterable

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
SHAPES = ("circle", "square", "triangle")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {  # well separated, saturated; a small per-image jitter is added when drawing
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
COLOR_NAMES = tuple(COLORS)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
WORDS = ("CAT", "DOG", "SUN", "BOX", "CAR", "HAT", "PEN", "CUP")
QUESTION_KINDS = ("count_all", "count_shape", "count_color", "color_of", "shape_at", "exists",
                  "describe", "read_word", "text_only")
IMAGE_KINDS = QUESTION_KINDS[:-1]
TEXT_ONLY_QA = (
    ("What colors can the shapes have?", "The shapes can be red, green, blue or yellow."),
    ("What shapes can be in the image?", "The shapes can be circles, squares or triangles."),
)
MAX_SHAPES = 4  # at most one shape per quadrant

# 5x7 block-letter bitmaps for the letters of WORDS ("#" = ink).
_GLYPHS = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.###.",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "N": "#...#|##..#|#.#.#|#..##|#...#|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
}


# ----------------------------------------------------------------------------------------------- answers
def answer_is_correct(pred: str, gold: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return pred.strip() == gold.strip()


def _count_sentence(n: int, singular: str, plural: str) -> str:
    if n == 0:
        return f"There are no {plural}."
    if n == 1:
        return f"There is 1 {singular}."
    return f"There are {n} {plural}."


def question_and_answer(kind: str, shapes: list[dict], word: str | None, arg=None) -> tuple[str, str]:
    """The fixed template of ``kind`` for a picture described by ``shapes`` / ``word``.

    ``arg`` is the kind's parameter: a shape name (count_shape, color_of), a colour (count_color), a quadrant
    (shape_at), a (colour, shape) pair (exists), an index into TEXT_ONLY_QA (text_only), None otherwise.
    """
    if kind == "count_all":
        return "How many shapes are there?", _count_sentence(len(shapes), "shape", "shapes")
    if kind == "count_shape":
        n = sum(s["shape"] == arg for s in shapes)
        return (f"How many {SHAPE_PLURALS[arg]} are there?",
                _count_sentence(n, arg, SHAPE_PLURALS[arg]))
    if kind == "count_color":
        n = sum(s["color"] == arg for s in shapes)
        return f"How many {arg} shapes are there?", _count_sentence(n, f"{arg} shape", f"{arg} shapes")
    if kind == "color_of":
        (match,) = [s for s in shapes if s["shape"] == arg]  # only asked when unique
        return f"What color is the {arg}?", f"The {arg} is {match['color']}."
    if kind == "shape_at":
        here = [s for s in shapes if s["quadrant"] == arg]
        q = f"What is in the {arg}?"
        if not here:
            return q, f"There is nothing in the {arg}."
        return q, f"There is a {here[0]['color']} {here[0]['shape']} in the {arg}."
    if kind == "exists":
        color, shape = arg
        q = f"Is there a {color} {shape}?"
        if any(s["color"] == color and s["shape"] == shape for s in shapes):
            return q, f"Yes, there is a {color} {shape}."
        return q, f"No, there is no {color} {shape}."
    if kind == "describe":
        if word is not None:
            return "Describe the image.", f"The word {word}."
        (s,) = shapes  # only asked for single-shape pictures
        return "Describe the image.", f"A {s['color']} {s['shape']}."
    if kind == "read_word":
        return "What word is written in the image?", f"The word is {word}."
    if kind == "text_only":
        return TEXT_ONLY_QA[arg]
    raise ValueError(f"unknown question kind {kind!r}")


def applicable_kinds(shapes: list[dict], word: str | None) -> list[str]:
    if word is not None:
        return ["read_word", "describe"]
    kinds = ["count_all", "count_shape", "count_color", "shape_at", "exists"]
    if any(sum(s["shape"] == t for s in shapes) == 1 for t in SHAPES):
        kinds.insert(3, "color_of")
    if len(shapes) == 1:
        kinds.append("describe")
    return kinds


def _pick_arg(rng: random.Random, kind: str, shapes: list[dict]):
    if kind == "count_shape":
        return rng.choice(SHAPES)
    if kind == "count_color":
        return rng.choice(COLOR_NAMES)
    if kind == "color_of":
        return rng.choice([t for t in SHAPES if sum(s["shape"] == t for s in shapes) == 1])
    if kind == "shape_at":
        return rng.choice(QUADRANTS)
    if kind == "exists":
        present = sorted({(s["color"], s["shape"]) for s in shapes})
        absent = [(c, t) for c in COLOR_NAMES for t in SHAPES if (c, t) not in present]
        return rng.choice(present if rng.random() < 0.5 else absent)
    if kind == "text_only":
        return rng.randrange(len(TEXT_ONLY_QA))
    return None


# ----------------------------------------------------------------------------------------------- drawing
def _jitter_color(rng: random.Random, rgb, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random) -> tuple[int, int, int]:
    return _jitter_color(rng, (240, 240, 235), 8)


def _sample_shapes(rng: random.Random, size: int) -> list[dict]:
    n = rng.randint(1, MAX_SHAPES)
    quadrants = sorted(rng.sample(range(4), n))
    half = size // 2
    out = []
    for q in quadrants:
        # 40..42 px at 112: nearly one size, so the three shapes differ in area (square > circle > triangle)
        # as well as in outline; with 32..43 px a tiny ViT at 56x56 input could not tell them apart (~chance).
        extent = rng.randint(int(size * 0.36), int(size * 0.375))
        slack = (half - extent) // 2 - 2  # keeps >= 2 px to the quadrant border
        cx = (q % 2) * half + half // 2 + rng.randint(-slack, slack)
        cy = (q // 2) * half + half // 2 + rng.randint(-slack, slack)
        shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        out.append({"shape": shape, "color": color, "quadrant": QUADRANTS[q], "center": [cx, cy],
                    "extent": extent, "fill": list(_jitter_color(rng, COLORS[color], 12))})
    return out


def _sample_word_layout(rng: random.Random, word: str, size: int) -> dict:
    cell = max(2, size // 22)  # 5 px at 112: letters 25x35 px, the word 85 px wide
    cols = 6 * len(word) - 1
    x0 = (size - cols * cell) // 2 + rng.randint(-cell, cell)
    y0 = (size - 7 * cell) // 2 + rng.randint(-2 * cell, 2 * cell)
    return {"origin": [x0, y0], "cell": cell, "ink": list(_jitter_color(rng, (30, 30, 30), 20))}


def render(meta: dict, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the picture described by an example's ``meta`` (a pure function of it)."""
    img = Image.new("RGB", (size, size), tuple(meta["background"]))
    draw = ImageDraw.Draw(img)
    for s in meta["shapes"]:
        (cx, cy), r = s["center"], s["extent"] / 2
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = tuple(s["fill"])
        if s["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif s["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    if meta["word"] is not None:
        lay = meta["layout"]
        (x0, y0), cell, ink = lay["origin"], lay["cell"], tuple(lay["ink"])
        for i, ch in enumerate(meta["word"]):
            for r, row in enumerate(_GLYPHS[ch].split("|")):
                for c, px in enumerate(row):
                    if px == "#":
                        x, y = x0 + (6 * i + c) * cell, y0 + r * cell
                        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=ink)
    return img


# ----------------------------------------------------------------------------------------------- examples
def make_example(rng: random.Random, *, size: int = IMAGE_SIZE, word_prob: float = 0.12,
                 text_only_prob: float = 0.0, kinds: Iterable[str] | None = None, draw: bool = True) -> dict:
    """One example: ``dict(image=PIL.Image | None, question=str, answer=str, meta=dict)``.

    ``meta`` = {kind, arg, shapes: [{shape, color, quadrant, center, extent, fill}], word, background, layout}
    describes the picture completely (``render(meta)`` redraws it). ``kinds`` restricts the question kinds (a
    picture is resampled until one of them applies). ``draw=False`` skips rendering (image=None); the random
    stream, hence every later example, is the same as with ``draw=True``.
    """
    if size % 28:
        raise ValueError("size must be a multiple of 28")
    allowed = set(QUESTION_KINDS if kinds is None else kinds)
    unknown = allowed - set(QUESTION_KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}")
    if "text_only" in allowed and (rng.random() < text_only_prob or allowed == {"text_only"}):
        arg = _pick_arg(rng, "text_only", [])
        q, a = question_and_answer("text_only", [], None, arg)
        return {"image": None, "question": q, "answer": a, "meta": {
            "kind": "text_only", "arg": arg, "shapes": [], "word": None, "background": None, "layout": None}}
    if not allowed - {"text_only"}:
        raise ValueError("no image question kind allowed")
    if not allowed & {"count_all", "count_shape", "count_color", "color_of", "shape_at", "exists", "describe"}:
        word_prob = 1.0
    elif not allowed & {"read_word", "describe"}:
        word_prob = 0.0
    while True:
        background = list(_background(rng))
        if rng.random() < word_prob:
            word = rng.choice(WORDS)
            shapes, layout = [], _sample_word_layout(rng, word, size)
        else:
            shapes, word, layout = _sample_shapes(rng, size), None, None
        options = [k for k in applicable_kinds(shapes, word) if k in allowed]
        if options:
            break
    kind = rng.choice(options)
    arg = _pick_arg(rng, kind, shapes)
    q, a = question_and_answer(kind, shapes, word, arg)
    meta = {"kind": kind, "arg": list(arg) if isinstance(arg, tuple) else arg, "shapes": shapes, "word": word,
            "background": background, "layout": layout}
    return {"image": render(meta, size) if draw else None, "question": q, "answer": a, "meta": meta}


def make_dataset(n: int, seed: int, **kwargs) -> list[dict]:
    """``n`` examples from ``random.Random(seed)``; same (n, seed, kwargs) -> identical examples."""
    rng = random.Random(seed)
    return [make_example(rng, **kwargs) for _ in range(n)]


def to_messages(question: str, answer: str | None, image_ref=None) -> list[dict]:
    """Conversation in the processor's message format; ``image_ref`` None -> text-only user turn."""
    content = ([{"type": "image", "image": image_ref}] if image_ref is not None else [])
    content.append({"type": "text", "text": question})
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def write_jsonl(path: str, n: int, seed: int, *, image_dir: str = "images", **kwargs) -> str:
    """Write ``n`` examples: PNGs under ``<dirname(path)>/<image_dir>/`` and one JSON line per example:
    ``{"messages": [...], "meta": {...}}`` with image paths relative to the JSONL file. Returns ``path``."""
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(make_dataset(n, seed, **kwargs)):
            ref = None
            if ex["image"] is not None:
                ref = f"{image_dir}/{i:06d}.png"
                ex["image"].save(os.path.join(root, ref), format="PNG")
            rec = {"messages": to_messages(ex["question"], ex["answer"], ref), "meta": ex["meta"]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str, *, load_images: bool = False) -> list[dict]:
    """Read a file written by ``write_jsonl``: ``dict(image, question, answer, meta, messages)`` per line, with
    ``image`` an absolute path (or a loaded RGB PIL image when ``load_images``; None for text-only)."""
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            user, assistant = rec["messages"][0]["content"], rec["messages"][1]["content"]
            image = next((c["image"] for c in user if c["type"] == "image"), None)
            if image is not None:
                image = os.path.join(root, image)
                if load_images:
                    with Image.open(image) as im:
                        image = im.convert("RGB")
            out.append({"image": image, "question": next(c["text"] for c in user if c["type"] == "text"),
                        "answer": assistant[0]["text"], "meta": rec.get("meta"), "messages": rec["messages"]})
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qwen2vl.demo.data",
                                description="Write synthetic shapes/words conversations as a training JSONL + PNGs.")
    p.add_argument("--out", required=True, help="JSONL path; pictures go to <its folder>/images/")
    p.add_argument("-n", type=int, default=1000, help="number of conversations")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_jsonl(a.out, a.n, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
