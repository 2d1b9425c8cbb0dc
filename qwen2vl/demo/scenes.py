"""Pictures for the demo model: a scene (canvas, background, shapes) sampled from a seed, and its drawing.

A scene is a plain dict (JSON-serialisable, so a JSONL record carries it and ``render(scene)`` redraws it):

    {"size": [W, H], "background": [r, g, b], "noise": sigma, "noise_seed": int, "aa": bool,
     "shapes": [{"shape": "circle" | "square" | "triangle", "color": "red" | ..., "rgb": [r, g, b],
                 "center": [x, y], "extent": px, "outline": 0 (filled) | line width px,
                 "angle": degrees, "aspect": triangle height / base}, ...]}

What it covers is what a person draws in a paint program and asks about: canvases 56-448 px a side at many
aspect ratios (the processor turns them into 4-16 visual tokens: dynamic resolution), 1-6 shapes anywhere
(not on a grid), sizes from small to filling the canvas, filled or outlined, white / tinted / noisy backgrounds,
anti-aliased or not, colours anywhere inside each named family (pure paint-program colours included).
"""
from __future__ import annotations

import colorsys
import math
import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Each colour family: a hue range (degrees), saturation and value ranges, plus paint-program pure colours.
COLOR_FAMILIES = {
    "red": {"hue": (-10, 10), "sat": (0.65, 1.0), "val": (0.65, 1.0),
            "pure": [(255, 0, 0), (220, 40, 40), (200, 0, 0)]},
    "green": {"hue": (95, 145), "sat": (0.55, 1.0), "val": (0.45, 1.0),
              "pure": [(0, 255, 0), (0, 128, 0), (40, 170, 60)]},
    "blue": {"hue": (208, 242), "sat": (0.6, 1.0), "val": (0.6, 1.0),
             "pure": [(0, 0, 255), (40, 80, 220), (30, 60, 200)]},
    "yellow": {"hue": (50, 60), "sat": (0.75, 1.0), "val": (0.88, 1.0),
               "pure": [(255, 255, 0), (235, 200, 30), (250, 220, 0)]},
}
COLOR_NAMES = tuple(COLOR_FAMILIES)
MAX_SHAPES = 6
MIN_SIDE, MAX_SIDE = 56, 448
# 3 x 3 regions of the canvas and how an answer names them ("The circle is in the top left.")
COLS, ROWS = ("left", "center", "right"), ("top", "middle", "bottom")
REGION_PHRASES = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
REGION_MARGIN = 0.06  # a shape whose centre is this close (fraction of the side) to a third-line has no clear region


def sample_color(rng: random.Random, family: str) -> tuple[int, int, int]:
    fam = COLOR_FAMILIES[family]
    if rng.random() < 0.3:
        return rng.choice(fam["pure"])
    h = (rng.uniform(*fam["hue"]) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*fam["sat"]), rng.uniform(*fam["val"]))
    return round(r * 255), round(g * 255), round(b * 255)


def sample_background(rng: random.Random) -> tuple[list[int], float]:
    """(rgb, noise sigma): white 45 %, a light tint 35 %, a light tint with pixel noise 20 %."""
    u = rng.random()
    if u < 0.45:
        return [255, 255, 255], 0.0
    h, s, v = rng.random(), rng.uniform(0.0, 0.14), rng.uniform(0.86, 1.0)
    rgb = [round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)]
    return rgb, (rng.uniform(4, 22) if u > 0.8 else 0.0)


def sample_size(rng: random.Random) -> list[int]:
    """Canvas [W, H]: a side in 56..448 and an aspect ratio up to 3:1 either way."""
    long = rng.randint(MIN_SIDE, MAX_SIDE)
    ratio = math.exp(rng.uniform(-math.log(3), math.log(3))) if rng.random() < 0.6 else 1.0
    w, h = (long, long / ratio) if ratio >= 1 else (long * ratio, long)
    w, h = max(MIN_SIDE, round(w)), max(MIN_SIDE, round(h))
    return [w, h]


def area(s: dict) -> float:
    e = s["extent"]
    return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5 * s.get("aspect", 1.0)}[s["shape"]] * e * e


def region(s: dict, size) -> tuple[str, str] | None:
    """(row, col) of the shape's centre in the 3 x 3 regions, None when it sits on a dividing line."""
    out = []
    for v, side, names in ((s["center"][1], size[1], ROWS), (s["center"][0], size[0], COLS)):
        f = v / side
        if min(abs(f - 1 / 3), abs(f - 2 / 3)) < REGION_MARGIN:
            return None
        out.append(names[min(2, int(f * 3))])
    return out[0], out[1]


def sample_shapes(rng: random.Random, size, n: int | None = None, big: bool = False) -> list[dict]:
    """``n`` (default 1-6, fewer on small canvases) non-overlapping shapes; ``big``: one shape filling 40-90 %."""
    w, h = size
    side = min(w, h)
    if n is None:
        n = 1 if rng.random() < 0.3 else rng.randint(1, MAX_SHAPES)
    n = max(1, min(n, int(w * h / (side * 0.28) ** 2 / 1.6)))
    hi = 0.9 if n == 1 else (0.5 if n == 2 else 0.36)
    lo = 0.4 if big else (0.18 if side >= 112 else 0.3)
    out: list[dict] = []
    for _ in range(400):
        if len(out) == n:
            break
        e = side * rng.uniform(lo, max(lo, hi))
        r = e * 0.56  # radius that covers a rotated square too
        if 2 * r + 4 > min(w, h):
            continue
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if any(math.hypot(cx - o["center"][0], cy - o["center"][1]) < r + o["extent"] * 0.56 + 3 for o in out):
            continue
        shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        outline = 0 if rng.random() < 0.7 else max(2, round(e * rng.uniform(0.07, 0.14)))
        out.append({"shape": shape, "color": color, "rgb": list(sample_color(rng, color)),
                    "center": [round(cx, 1), round(cy, 1)], "extent": round(e, 1), "outline": outline,
                    "angle": round(rng.uniform(-12, 12), 1) if rng.random() < 0.3 else 0.0,
                    "aspect": round(rng.uniform(0.8, 1.1), 2) if shape == "triangle" else 1.0})
    return out


def sample_scene(rng: random.Random, n: int | None = None, size=None, big: bool = False) -> dict:
    size = list(size) if size is not None else sample_size(rng)
    background, noise = sample_background(rng)
    shapes = sample_shapes(rng, size, n, big)
    while any(s["rgb"] == background for s in shapes):  # never invisible
        background = [255, 255, 255]
    return {"size": size, "background": background, "noise": round(noise, 1),
            "noise_seed": rng.randrange(2 ** 31), "aa": rng.random() < 0.5, "shapes": shapes}


def polygon(s: dict, scale: float = 1.0) -> list[tuple[float, float]] | None:
    """Corner points of a square / triangle (None for a circle), rotated by its angle, times ``scale``."""
    (cx, cy), r = s["center"], s["extent"] / 2
    if s["shape"] == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif s["shape"] == "triangle":
        hh = r * s.get("aspect", 1.0)
        pts = [(0, -hh), (r, hh), (-r, hh)]
    else:
        return None
    a = math.radians(s.get("angle", 0.0))
    ca, sa = math.cos(a), math.sin(a)
    return [((cx + x * ca - y * sa) * scale, (cy + x * sa + y * ca) * scale) for x, y in pts]


def contains(s: dict, x: float, y: float) -> bool:
    """Is (x, y) inside the shape's outline (the interior counts for outlined shapes too)?"""
    (cx, cy), r = s["center"], s["extent"] / 2
    if s["shape"] == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    pts = polygon(s)
    sign = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        if cross != 0:
            if sign is None:
                sign = cross > 0
            elif (cross > 0) != sign:
                return False
    return True


def draw_shape(draw: ImageDraw.ImageDraw, s: dict, scale: float = 1.0) -> None:
    fill, width = tuple(s["rgb"]), round(s["outline"] * scale)
    if s["shape"] == "circle":
        (cx, cy), r = s["center"], s["extent"] / 2
        box = [(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale]
        if width:
            draw.ellipse(box, outline=fill, width=width)
        else:
            draw.ellipse(box, fill=fill)
    elif width:
        pts = polygon(s, scale)
        draw.line(pts + pts[:1], fill=fill, width=width, joint="curve")
    else:
        draw.polygon(polygon(s, scale), fill=fill)


def render(scene: dict) -> Image.Image:
    """Draw a scene (a pure function of it): supersampled x3 and reduced when ``aa``, then background noise."""
    w, h = scene["size"]
    k = 3 if scene.get("aa") else 1
    img = Image.new("RGB", (w * k, h * k), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        draw_shape(draw, s, k)
    if k > 1:
        img = img.resize((w, h), Image.Resampling.BOX)
    if scene.get("noise"):
        arr = np.asarray(img, dtype=np.float32)
        noise = np.random.default_rng(scene["noise_seed"]).normal(0, scene["noise"], arr.shape)
        img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    return img
