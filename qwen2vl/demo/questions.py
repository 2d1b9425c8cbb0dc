"""Questions about a scene (``scenes``) and their one-sentence answers, several phrasings per kind.

Kinds (IMAGE_KINDS) and answer forms:
  shape        single shape "What shape is this?" -> "It is a circle."; several, one clearly biggest:
               "What is the biggest shape?" -> "The biggest shape is a circle."
  color        "What color is the circle?" (the shape / the circle / the biggest shape) -> "The circle is red."
  where        "Where is the circle?" (the shape / the circle / the red shape) -> "The circle is in the top left."
               (3 x 3 regions: "in the top left", "at the top", "on the left", "in the center", ...)
  what_at      "What is in the top right?" -> "There is a blue square in the top right." / "There is nothing ..."
  count_all    "How many shapes are there?" -> "There are 3 shapes." / "There is 1 shape."
  count_shape  "How many circles are there?" -> "There are 2 circles." / "There is 1 circle." / "There are no ..."
  count_color  "How many red shapes are there?" -> "There are 2 red shapes." / ...
  exists       "Is there a green triangle?" -> "Yes, there is a green triangle." / "No, there is no green triangle."
  describe     "Describe the image." -> "A red circle." / "3 shapes: a red circle, a blue square and a yellow
               triangle." (listed left to right)
  text_only    (no picture) "What colors can the shapes have?" -> "The shapes can be red, green, blue or yellow."

``ask(rng, kind, scene)`` picks the target and a phrasing; ``applicable_kinds(scene)`` says which kinds have a
well-defined answer for a scene (e.g. ``where`` needs a target clearly inside one region).
"""
from __future__ import annotations

import random

from .scenes import COLOR_NAMES, REGION_PHRASES, SHAPE_PLURALS, SHAPES, area, region

IMAGE_KINDS = ("shape", "color", "where", "what_at", "count_all", "count_shape", "count_color", "exists", "describe")
QUESTION_KINDS = IMAGE_KINDS + ("text_only",)
TEXT_ONLY_QA = (
    ("What colors can the shapes have?", "The shapes can be red, green, blue or yellow."),
    ("What shapes can be in the image?", "The shapes can be circles, squares or triangles."),
)
# Training phrasings; {t} = a target noun phrase ("the circle"), {p} plural, {c} colour, {s} shape, {r} region.
PHRASINGS = {
    "shape_single": ["What shape is this?", "What shape is in the image?", "What shape is in the picture?",
                     "What shape do you see?", "Which shape is shown?", "What shape is it?", "Name the shape.",
                     "What kind of shape is this?", "What is the shape?", "What shape is drawn here?"],
    "shape_biggest": ["What is the biggest shape?", "Which shape is the biggest?", "What is the largest shape?",
                      "Which shape is largest?", "What shape is the biggest one?", "Name the biggest shape."],
    "color": ["What color is {t}?", "What colour is {t}?", "Which color is {t}?", "What is the color of {t}?",
              "Tell me the color of {t}.", "What color does {t} have?", "{T} is what color?"],
    "where": ["Where is {t}?", "Where is {t} located?", "Where is {t} in the image?", "Where can I find {t}?",
              "In which part of the image is {t}?", "What is the position of {t}?", "Where is {t} placed?"],
    "what_at": ["What is {r}?", "What is there {r}?", "What can you see {r}?", "What do you see {r}?",
                "Which shape is {r}?"],
    "count_all": ["How many shapes are there?", "How many shapes are in the image?", "How many shapes do you see?",
                  "Count the shapes.", "How many objects are there?", "What is the number of shapes?",
                  "How many shapes are in the picture?", "How many shapes can you see?"],
    "count_shape": ["How many {p} are there?", "How many {p} are in the image?", "How many {p} do you see?",
                    "Count the {p}.", "What is the number of {p}?", "How many {p} can you see?"],
    "count_color": ["How many {c} shapes are there?", "How many {c} shapes do you see?", "Count the {c} shapes.",
                    "How many shapes are {c}?", "How many {c} things are there?", "What is the number of {c} shapes?"],
    "exists": ["Is there a {c} {s}?", "Is there a {c} {s} in the image?", "Do you see a {c} {s}?",
               "Can you see a {c} {s}?", "Does the picture have a {c} {s}?", "Is a {c} {s} shown?"],
    "describe": ["Describe the image.", "Describe the picture.", "What is in the image?", "What do you see?",
                 "What is in this picture?", "Describe this image.", "What does the image show?"],
}
# How often each kind is picked among those that apply (the harder kinds more often).
KIND_WEIGHTS = {"describe": 2.0, "where": 1.5, "what_at": 1.5, "shape": 1.5, "color": 1.2}
# Light variation around a phrasing (the model should key on the content words, not on the exact string).
PREFIXES = ("",) * 8 + ("Please answer: ", "Question: ", "Look at the image. ", "Hey, ")


def _count_sentence(n: int, singular: str, plural: str) -> str:
    if n == 0:
        return f"There are no {plural}."
    if n == 1:
        return f"There is 1 {singular}."
    return f"There are {n} {plural}."


def _unique(shapes, key, value):
    found = [s for s in shapes if s[key] == value]
    return found[0] if len(found) == 1 else None


def biggest(shapes: list[dict]) -> dict | None:
    """The shape whose area is at least 1.5 x every other's (None if no shape stands out)."""
    if len(shapes) < 2:
        return None
    order = sorted(shapes, key=area, reverse=True)
    return order[0] if area(order[0]) >= 1.5 * area(order[1]) else None


def targets(kind: str, scene: dict) -> list[tuple[str, dict]]:
    """(noun phrase, shape) pairs a ``color`` / ``where`` question can be about unambiguously."""
    shapes = scene["shapes"]
    out = []
    if len(shapes) == 1:
        out.append(("the shape", shapes[0]))
    for t in SHAPES:
        s = _unique(shapes, "shape", t)
        if s is not None:
            out.append((f"the {t}", s))
    if kind == "color" and biggest(shapes) is not None:
        out.append(("the biggest shape", biggest(shapes)))
    if kind == "where":
        for c in COLOR_NAMES:
            s = _unique(shapes, "color", c)
            if s is not None:
                out.append((f"the {c} shape", s))
        out = [(t, s) for t, s in out if region(s, scene["size"]) is not None]
    return out


def applicable_kinds(scene: dict) -> list[str]:
    shapes = scene["shapes"]
    kinds = ["count_all", "count_shape", "count_color", "exists", "describe"]
    if len(shapes) == 1 or biggest(shapes) is not None:
        kinds.append("shape")
    if targets("color", scene):
        kinds.append("color")
    if targets("where", scene):
        kinds.append("where")
    if all(region(s, scene["size"]) is not None for s in shapes):
        kinds.append("what_at")
    return kinds


def _describe(shapes: list[dict]) -> str:
    if len(shapes) == 1:
        return f"A {shapes[0]['color']} {shapes[0]['shape']}."
    names = [f"a {s['color']} {s['shape']}" for s in sorted(shapes, key=lambda s: s["center"][0])]
    return f"{len(shapes)} shapes: {', '.join(names[:-1])} and {names[-1]}."


def answer(kind: str, scene: dict, arg) -> str:
    """The answer sentence for ``kind`` with parameter ``arg`` (see ``pick_arg``)."""
    shapes = scene["shapes"]
    if kind == "shape":
        if len(shapes) == 1:
            return f"It is a {shapes[0]['shape']}."
        return f"The biggest shape is a {biggest(shapes)['shape']}."
    if kind in ("color", "where"):
        target, subject = dict(targets(kind, scene))[arg], arg[0].upper() + arg[1:]
        if kind == "color":
            return f"{subject} is {target['color']}."
        return f"{subject} is {REGION_PHRASES[region(target, scene['size'])]}."
    if kind == "what_at":
        here = [s for s in shapes if region(s, scene["size"]) == tuple(arg)]
        where = REGION_PHRASES[tuple(arg)]
        if not here:
            return f"There is nothing {where}."
        return f"There is a {here[0]['color']} {here[0]['shape']} {where}."
    if kind == "count_all":
        return _count_sentence(len(shapes), "shape", "shapes")
    if kind == "count_shape":
        return _count_sentence(sum(s["shape"] == arg for s in shapes), arg, SHAPE_PLURALS[arg])
    if kind == "count_color":
        return _count_sentence(sum(s["color"] == arg for s in shapes), f"{arg} shape", f"{arg} shapes")
    if kind == "exists":
        c, t = arg
        if any(s["color"] == c and s["shape"] == t for s in shapes):
            return f"Yes, there is a {c} {t}."
        return f"No, there is no {c} {t}."
    if kind == "describe":
        return _describe(shapes)
    raise ValueError(f"unknown question kind {kind!r}")


def pick_arg(rng: random.Random, kind: str, scene: dict):
    shapes = scene["shapes"]
    if kind in ("color", "where"):
        return rng.choice(targets(kind, scene))[0]
    if kind == "what_at":
        taken = [region(s, scene["size"]) for s in shapes]
        cells = list(REGION_PHRASES)
        # half the time a cell with a shape in it (only one), else any cell (mostly empty ones)
        single = [c for c in cells if taken.count(c) == 1]
        pool = single if single and rng.random() < 0.6 else [c for c in cells if taken.count(c) <= 1]
        return list(rng.choice(pool))
    if kind == "count_shape":
        return rng.choice(SHAPES)
    if kind == "count_color":
        return rng.choice(COLOR_NAMES)
    if kind == "exists":
        present = sorted({(s["color"], s["shape"]) for s in shapes})
        absent = [(c, t) for c in COLOR_NAMES for t in SHAPES if (c, t) not in present]
        return list(rng.choice(present if rng.random() < 0.5 else absent))
    return None


def phrase(rng: random.Random, kind: str, scene: dict, arg, phrasings: dict | None = None) -> str:
    """A question for ``kind`` / ``arg`` in one of ``phrasings`` (default: the training PHRASINGS)."""
    table = PHRASINGS if phrasings is None else phrasings
    if kind == "shape":
        key = "shape_single" if len(scene["shapes"]) == 1 else "shape_biggest"
    else:
        key = kind
    fields = {}
    if kind in ("color", "where"):
        fields = {"t": arg, "T": arg[0].upper() + arg[1:]}
    elif kind == "what_at":
        fields = {"r": REGION_PHRASES[tuple(arg)]}
    elif kind == "count_shape":
        fields = {"p": SHAPE_PLURALS[arg]}
    elif kind == "count_color":
        fields = {"c": arg}
    elif kind == "exists":
        fields = {"c": arg[0], "s": arg[1]}
    q = rng.choice(table[key]).format(**fields)
    if phrasings is not None:
        return q
    prefix = rng.choice(PREFIXES)
    return prefix + (q[0].lower() + q[1:] if prefix.endswith(", ") else q)


def ask(rng: random.Random, kind: str, scene: dict, phrasings: dict | None = None):
    """(question, answer, arg) for a kind that applies to ``scene``."""
    arg = pick_arg(rng, kind, scene)
    return phrase(rng, kind, scene, arg, phrasings), answer(kind, scene, arg), arg
