"""A second, independently written picture and clip maker for evaluating the demo model (tests only).

It shares no code with ``qwen2vl.demo`` (scenes / questions / video): pictures are rasterised here with numpy
(per-pixel coverage from 4 x 4 sub-samples: analytic circles, axis-aligned squares, equilateral triangles),
on canvas sizes people use (100x100 ... 480x360), with named web colours inside each colour family, optional
JPEG compression, and questions worded in ways the training data never uses (``HELDOUT_PHRASINGS``). Gold
answers and the scorer (``meaning``) are written here too.

    PYTHONPATH=. python tests/demo_heldout.py [CHECKPOINT]   # per-kind accuracy tables (markdown)
"""
from __future__ import annotations

import io
import math
import random
import re

import numpy as np
from PIL import Image

PALETTE = {  # web colour names within each family
    "red": [(255, 0, 0), (220, 20, 60), (178, 34, 34), (205, 30, 30)],
    "green": [(0, 128, 0), (34, 139, 34), (50, 205, 50), (0, 180, 0)],
    "blue": [(0, 0, 255), (0, 0, 205), (65, 105, 225), (30, 144, 255)],
    "yellow": [(255, 255, 0), (255, 215, 0), (240, 230, 60), (255, 235, 59)],
}
KINDS = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
CANVASES = [(100, 100), (150, 100), (200, 200), (224, 224), (256, 256), (300, 200), (320, 240), (400, 300),
            (128, 96), (480, 360), (180, 240), (360, 120)]
BACKGROUNDS = [(255, 255, 255), (245, 245, 245), (250, 248, 240), (235, 242, 250), (248, 238, 238)]
PLACE = {("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
         ("middle", "left"): "on the left", ("middle", "center"): "in the center",
         ("middle", "right"): "on the right", ("bottom", "left"): "in the bottom left",
         ("bottom", "center"): "at the bottom", ("bottom", "right"): "in the bottom right"}
HELDOUT_PHRASINGS = {
    "shape_single": ["Which shape can you see?", "What shape is shown in the picture?", "What shape is drawn?",
                     "Tell me the shape in the image."],
    "shape_biggest": ["Which is the biggest shape?", "What shape is the largest?"],
    "color": ["What is the colour of {t}?", "Tell me what color {t} is.", "Can you tell me the color of {t}?"],
    "where": ["Where in the picture is {t}?", "Tell me where {t} is.", "Where is {t} drawn?"],
    "what_at": ["What is drawn {r}?", "Tell me what is {r}."],
    "count_all": ["How many shapes are in this image?", "How many shapes does the picture have?",
                  "Count all the shapes."],
    "count_shape": ["How many {p} are in the picture?", "How many {p} can be seen?", "Count all the {p}."],
    "count_color": ["How many {c} shapes are in the picture?", "Count all the {c} shapes."],
    "exists": ["Is there a {c} {s} in the picture?", "Does the image contain a {c} {s}?", "Is a {c} {s} visible?"],
    "describe": ["Describe what you see.", "What is in the picture?", "What is shown in the image?"],
    "move": ["Which direction does the {s} go?", "In what direction is the {s} moving?"],
    "appear": ["What shape appears in the video?", "Which shape shows up in the video?"],
    "recolor": ["What color does the {s} change to?", "How does the color of the {s} change in the video?"],
    "describe_video": ["Describe this video.", "What happens in this video?"],
}


# ------------------------------------------------------------------------------------------------- drawing
def _coverage(kind: str, cx: float, cy: float, half: float, w: int, h: int, line: float) -> np.ndarray:
    """(h, w) float coverage of a shape of half-size ``half`` (4 x 4 sub-samples per pixel); ``line`` > 0: outline."""
    sub = (np.arange(4) + 0.5) / 4
    ys = (np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    x, y = xs[None, :] - cx, ys[:, None] - cy

    def inside(r):
        if kind == "circle":
            return x * x + y * y <= r * r
        if kind == "square":
            return (np.abs(x) <= r) & (np.abs(y) <= r)
        # equilateral, apex up, centred on its bounding box; r = half the base
        top, bottom = -r * math.sqrt(3) / 2, r * math.sqrt(3) / 2
        t = (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x) <= t * r)

    m = inside(half)
    if line > 0:
        m = m & ~inside(half - line * (2.0 if kind == "triangle" else 1.0))
    return m.reshape(h, 4, w, 4).mean(axis=(1, 3))


def draw(pic: dict) -> Image.Image:
    w, h = pic["size"]
    img = np.empty((h, w, 3), np.float32)
    img[:] = pic["background"]
    for s in pic["shapes"]:
        cov = _coverage(s["shape"], s["x"], s["y"], s["half"], w, h, s["line"])[..., None]
        img = img * (1 - cov) + np.asarray(s["rgb"], np.float32) * cov
    out = Image.fromarray(np.round(img).astype(np.uint8))
    if pic.get("jpeg"):
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=85)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def _area(s):
    r = s["half"]
    return {"circle": math.pi * r * r, "square": 4 * r * r, "triangle": math.sqrt(3) * r * r}[s["shape"]]


def _place(s, size):
    """(row, col) of the centre, or None within 7 % of a third-line."""
    fx, fy = s["x"] / size[0], s["y"] / size[1]
    if any(abs(f - t) < 0.07 for f in (fx, fy) for t in (1 / 3, 2 / 3)):
        return None
    return ("top", "middle", "bottom")[int(fy * 3)], ("left", "center", "right")[int(fx * 3)]


def random_picture(rng: random.Random, n: int | None = None, size=None) -> dict:
    w, h = size or rng.choice(CANVASES)
    n = n or rng.choice([1, 1, 1, 2, 2, 3, 3, 4, 5])
    side = min(w, h)
    shapes = []
    while len(shapes) < n:
        half = side * (rng.uniform(0.2, 0.4) if n == 1 else rng.uniform(0.11, 0.19))
        x, y = rng.uniform(half + 3, w - half - 3), rng.uniform(half + 3, h - half - 3)
        if all(math.hypot(x - o["x"], y - o["y"]) > 1.25 * (half + o["half"]) + 4 for o in shapes):
            color = rng.choice(list(PALETTE))
            shapes.append({"shape": rng.choice(KINDS), "color": color, "rgb": rng.choice(PALETTE[color]),
                           "x": x, "y": y, "half": half,
                           "line": 0 if rng.random() < 0.75 else max(2.0, half * 0.15)})
    return {"size": [w, h], "background": rng.choice(BACKGROUNDS), "shapes": shapes, "jpeg": rng.random() < 0.25}


# ------------------------------------------------------------------------------------------------- questions
def _count(n, one, many):
    return f"There are no {many}." if n == 0 else (f"There is 1 {one}." if n == 1 else f"There are {n} {many}.")


def questions_for(rng: random.Random, pic: dict) -> list[tuple[str, str, str]]:
    """(kind, question, gold answer) triples with an unambiguous answer, one per applicable kind."""
    sh, size = pic["shapes"], pic["size"]
    out = []
    P = HELDOUT_PHRASINGS

    def q(key, **kw):
        return rng.choice(P[key]).format(**kw)

    by_area = sorted(sh, key=_area, reverse=True)
    big = by_area[0] if len(sh) == 1 or _area(by_area[0]) > 1.6 * _area(by_area[1]) else None
    if len(sh) == 1:
        out.append(("shape", q("shape_single"), f"It is a {sh[0]['shape']}."))
    elif big is not None:
        out.append(("shape", q("shape_biggest"), f"The biggest shape is a {big['shape']}."))
    named = [(f"the {k}", s) for k in KINDS for s in sh if [o["shape"] for o in sh].count(k) == 1 and s["shape"] == k]
    if len(sh) == 1:
        named.append(("the shape", sh[0]))
    if named:
        t, s = rng.choice(named)
        out.append(("color", q("color", t=t), f"{t.capitalize()} is {s['color']}."))
        placed = [(t, s) for t, s in named if _place(s, size)]
        if placed:
            t, s = rng.choice(placed)
            out.append(("where", q("where", t=t), f"{t.capitalize()} is {PLACE[_place(s, size)]}."))
    places = [_place(s, size) for s in sh]
    if None not in places:
        cell = rng.choice([c for c in PLACE if places.count(c) <= 1])
        here = [s for s, p in zip(sh, places) if p == cell]
        gold = f"There is a {here[0]['color']} {here[0]['shape']} {PLACE[cell]}." if here else \
            f"There is nothing {PLACE[cell]}."
        out.append(("what_at", q("what_at", r=PLACE[cell]), gold))
    out.append(("count_all", q("count_all"), _count(len(sh), "shape", "shapes")))
    k = rng.choice(KINDS)
    out.append(("count_shape", q("count_shape", p=PLURAL[k]), _count(sum(s["shape"] == k for s in sh), k, PLURAL[k])))
    c = rng.choice(list(PALETTE))
    out.append(("count_color", q("count_color", c=c),
                _count(sum(s["color"] == c for s in sh), f"{c} shape", f"{c} shapes")))
    c, k = (sh[0]["color"], sh[0]["shape"]) if rng.random() < 0.5 else (rng.choice(list(PALETTE)), rng.choice(KINDS))
    yes = any(s["color"] == c and s["shape"] == k for s in sh)
    out.append(("exists", q("exists", c=c, s=k), f"Yes, there is a {c} {k}." if yes else f"No, there is no {c} {k}."))
    if len(sh) == 1:
        desc = f"A {sh[0]['color']} {sh[0]['shape']}."
    else:
        desc = f"{len(sh)} shapes: " + ", ".join(f"a {s['color']} {s['shape']}" for s in sh) + "."
    out.append(("describe", q("describe"), desc))
    return out


# ------------------------------------------------------------------------------------------------- clips
def random_clip(rng: random.Random, event: str) -> tuple[np.ndarray, dict, str, str]:
    """(frames (F, H, W, 3), description, question, gold) for a 'move' / 'appear' / 'recolor' clip."""
    w, h = rng.choice([(96, 96), (128, 96), (160, 120), (200, 150), (120, 160)])
    frames = rng.randint(6, 16)
    kind, color = rng.choice(KINDS), rng.choice(list(PALETTE))
    color2 = rng.choice([c for c in PALETTE if c != color])
    half = min(w, h) * rng.uniform(0.13, 0.18)
    x0, y0 = rng.uniform(half + 2, w - half - 2), rng.uniform(half + 2, h - half - 2)
    d = rng.choice(["left", "right", "up", "down"])
    bg = rng.choice(BACKGROUNDS)
    out = []
    for i in range(frames):
        f = i / (frames - 1)
        x, y, rgb, visible = x0, y0, PALETTE[color][0], True
        if event == "move":
            lo, hi = half + 2, (w if d in ("left", "right") else h) - half - 2
            pos = lo + (hi - lo) * (f if d in ("right", "down") else 1 - f)
            x, y = (pos, y0) if d in ("left", "right") else (x0, pos)
        elif event == "appear":
            visible = i >= frames // 2
        else:
            rgb = PALETTE[color2][0] if i >= frames // 2 else PALETTE[color][0]
        pic = {"size": [w, h], "background": bg, "shapes": [{"shape": kind, "color": color, "rgb": rgb, "x": x, "y": y,
                                                             "half": half, "line": 0}] if visible else []}
        out.append(np.asarray(draw(pic)))
    P = HELDOUT_PHRASINGS
    if rng.random() < 0.3:
        q = rng.choice(P["describe_video"])
        gold = {"move": f"A {color} {kind} moves {d}.", "appear": f"A {color} {kind} appears.",
                "recolor": f"A {kind} turns from {color} to {color2}."}[event]
        return np.stack(out), {"event": event, "kind": "describe_video"}, q, gold
    q = rng.choice(P[event]).format(s=kind)
    gold = {"move": f"The {kind} moves {d}.", "appear": f"A {color} {kind} appears.",
            "recolor": f"The {kind} turns from {color} to {color2}."}[event]
    return np.stack(out), {"event": event, "kind": event}, q, gold


# ------------------------------------------------------------------------------------------------- scoring
_WORDS = {**{k: k for k in KINDS}, **{p: k for k, p in PLURAL.items()}, **{c: c for c in PALETTE},
          "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "no": "no", "yes": "yes",
          "nothing": "nothing", **{w: w for w in ("top", "bottom", "left", "right", "center", "up", "down")}}


def meaning(text: str) -> list[str]:
    return [w if w.isdigit() else _WORDS[w] for w in re.findall(r"[a-z]+|\d+", text.lower())
            if w.isdigit() or w in _WORDS]


def correct(pred: str, gold: str, kind: str) -> bool:
    a, b = meaning(pred), meaning(gold)
    return a == b if kind in ("recolor", "describe_video") else sorted(a) == sorted(b)


# ------------------------------------------------------------------------------------------------- evaluation
def image_set(n_pictures: int = 60, seed: int = 4242) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_pictures):
        pic = random_picture(rng)
        img = draw(pic)
        out += [{"image": img, "video": None, "question": q, "answer": a, "kind": k}
                for k, q, a in questions_for(rng, pic)]
    return out


def clip_set(n: int = 60, seed: int = 777) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        frames, desc, q, a = random_clip(rng, ("move", "appear", "recolor")[i % 3])
        out.append({"image": None, "video": frames, "question": q, "answer": a, "kind": desc["kind"]})
    return out


def per_kind(examples: list[dict], answers: list[str]) -> dict:
    table: dict[str, list[int]] = {}
    for ex, a in zip(examples, answers):
        table.setdefault(ex["kind"], [0, 0])
        table[ex["kind"]][0] += correct(a, ex["answer"], ex["kind"])
        table[ex["kind"]][1] += 1
    return table


def main(path: str = "qwen2vl-demo") -> None:
    """Print the per-kind accuracy (markdown) of a checkpoint on the three held-out sets."""
    from qwen2vl.demo.train_demo import answer_questions, held_out_set
    from qwen2vl.model import Qwen2VLForConditionalGeneration
    from qwen2vl.processing import AutoProcessor

    model, processor = Qwen2VLForConditionalGeneration.from_pretrained(path), AutoProcessor.from_pretrained(path)
    train_gen = [{**ex, "kind": ex["meta"]["kind"]} for ex in held_out_set(240)]
    sets = (("training generator, held-out seed (pictures + clips)", train_gen),
            ("second renderer, pictures, held-out phrasings", image_set()),
            ("second renderer, clips, held-out phrasings", clip_set()))
    for name, exs in sets:
        table = per_kind(exs, answer_questions(model, processor, exs))
        hits, total = sum(v[0] for v in table.values()), sum(v[1] for v in table.values())
        print(f"\n{name}: {hits}/{total} = {hits / total:.1%}\n\n| kind | right | % |\n|---|---|---|")
        for k, (h, n) in sorted(table.items()):
            print(f"| {k} | {h}/{n} | {h / n:.0%} |")


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:2])
