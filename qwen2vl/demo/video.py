"""Short generated clips for the demo model's video questions: one shape that moves, appears or changes colour.

A clip is a JSON-serialisable dict; ``render_clip(clip)`` draws its frames as a (F, H, W, 3) uint8 array, which
goes through the real video processor (frame sampling to ``SAMPLED_FRAMES``, resize, temporal patches of 2):

    {"size": [W, H], "frames": F, "fps": f, "background": [r, g, b], "noise": sigma, "noise_seed": int,
     "event": "move" | "appear" | "recolor", "shape": "circle", "color": "red", "rgb": [...],
     "color2": "blue" | None, "rgb2": [...] | None, "direction": "left" | "right" | "up" | "down" | None,
     "start": [x, y], "end": [x, y], "extent": px, "outline": 0 | px, "switch": frame index}

The change of an ``appear`` / ``recolor`` clip happens between the 2nd and 3rd of the frames the processor
samples, so the two temporal patches the model sees show "before" and "after".

Kinds (VIDEO_KINDS): move ("Which way does the circle move?" -> "The circle moves to the left."), appear
("What appears in the video?" -> "A red circle appears."), recolor ("What color does the square turn?" ->
"The square turns from red to blue."), describe_video ("Describe the video." -> "A red circle moves up." /
"A red circle appears." / "A square turns from red to blue.").
"""
from __future__ import annotations

import random

import numpy as np

from ..processing.video_processing import sample_frame_indices
from .scenes import COLOR_NAMES, SHAPES, render, sample_background, sample_color

SAMPLED_FRAMES = 4  # the demo video processor's num_frames: 2 temporal patches
VIDEO_KINDS = ("move", "appear", "recolor", "describe_video")
EVENT_KINDS = {"move": ("move", "describe_video"), "appear": ("appear", "describe_video"),
               "recolor": ("recolor", "describe_video")}
DIRECTIONS = ("left", "right", "up", "down")
VIDEO_PHRASINGS = {
    "move": ["Which way does the {s} move?", "In which direction does the {s} move?", "Where is the {s} going?",
             "Which direction is the {s} moving?", "How does the {s} move?", "Where does the {s} move?"],
    "appear": ["What appears in the video?", "What shows up in the video?", "Which shape appears?",
               "What appears?", "What comes into view?", "What new shape appears in the video?"],
    "recolor": ["What color does the {s} turn?", "How does the {s} change?", "Which color does the {s} become?",
                "What happens to the color of the {s}?", "How does the color of the {s} change?"],
    "describe_video": ["Describe the video.", "What happens in the video?", "What is going on in the video?",
                       "Describe what happens.", "What happens?"],
}


def sample_clip(rng: random.Random, event: str | None = None) -> dict:
    event = event or rng.choice(tuple(EVENT_KINDS))
    w = rng.randint(64, 224)
    h = max(56, min(224, round(w * rng.choice((1.0, 1.0, 0.75, 0.5625, 1.33)))))
    n = rng.randint(SAMPLED_FRAMES, 12)
    idx = sample_frame_indices(n, num_frames=SAMPLED_FRAMES)
    background, noise = sample_background(rng)
    shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
    side = min(w, h)
    e = side * rng.uniform(0.22, 0.4)
    r = e * 0.56
    x, y = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    start, end, direction, color2 = [x, y], [x, y], None, None
    if event == "move":
        direction = rng.choice(DIRECTIONS)
        axis, span = (0, w) if direction in ("left", "right") else (1, h)
        lo, hi = r + 1, span - r - 1
        travel = rng.uniform(0.45, 1.0) * (hi - lo)
        a = rng.uniform(lo, hi - travel)
        forward = direction in ("right", "down")
        start[axis], end[axis] = (a, a + travel) if forward else (a + travel, a)
    elif event == "recolor":
        color2 = rng.choice([c for c in COLOR_NAMES if c != color])
    return {"size": [w, h], "frames": n, "fps": rng.choice((2, 4, 8)), "background": background,
            "noise": round(noise, 1), "noise_seed": rng.randrange(2 ** 31), "event": event, "shape": shape,
            "color": color, "rgb": list(sample_color(rng, color)), "color2": color2,
            "rgb2": list(sample_color(rng, color2)) if color2 else None, "direction": direction,
            "start": [round(v, 1) for v in start], "end": [round(v, 1) for v in end], "extent": round(e, 1),
            "outline": 0 if rng.random() < 0.75 else max(2, round(e * 0.1)),
            "switch": rng.randint(idx[1] + 1, idx[2])}


def frame_scene(clip: dict, i: int) -> dict:
    """The still scene of frame ``i``."""
    f = i / max(1, clip["frames"] - 1)
    center = [round(a + (b - a) * f, 1) for a, b in zip(clip["start"], clip["end"])]
    after = i >= clip["switch"]
    shapes = []
    if clip["event"] != "appear" or after:
        recolored = clip["event"] == "recolor" and after
        shapes.append({"shape": clip["shape"], "color": clip["color2"] if recolored else clip["color"],
                       "rgb": clip["rgb2"] if recolored else clip["rgb"], "center": center,
                       "extent": clip["extent"], "outline": clip["outline"], "angle": 0.0, "aspect": 1.0})
    return {"size": clip["size"], "background": clip["background"], "noise": clip["noise"],
            "noise_seed": clip["noise_seed"] + i, "aa": False, "shapes": shapes}


def render_clip(clip: dict) -> np.ndarray:
    """(F, H, W, 3) uint8 frames."""
    return np.stack([np.asarray(render(frame_scene(clip, i))) for i in range(clip["frames"])])


def _answer(kind: str, clip: dict) -> str:
    s, c = clip["shape"], clip["color"]
    if kind == "move" or (kind == "describe_video" and clip["event"] == "move"):
        d = clip["direction"]
        where = f"to the {d}" if d in ("left", "right") else d
        return f"The {s} moves {where}." if kind == "move" else f"A {c} {s} moves {where}."
    if kind == "appear" or (kind == "describe_video" and clip["event"] == "appear"):
        return f"A {c} {s} appears."
    if kind == "recolor":
        return f"The {s} turns from {c} to {clip['color2']}."
    return f"A {s} turns from {c} to {clip['color2']}."


def ask_video(rng: random.Random, kind: str, clip: dict, phrasings: dict | None = None) -> tuple[str, str]:
    if kind not in EVENT_KINDS[clip["event"]]:
        raise ValueError(f"a {clip['event']!r} clip has no {kind!r} question")
    q = rng.choice((phrasings or VIDEO_PHRASINGS)[kind]).format(s=clip["shape"])
    return q, _answer(kind, clip)
