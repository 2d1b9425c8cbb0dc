"""The bundled example pictures (qwen2vl/demo/assets/exampleN.png) and what the demo model answers about them.

example1: the README's main job (3 shapes in the corners of a 112 x 112 picture); example2: a drawing as a user
makes one (a big blue circle in the middle of a white 224 x 224 canvas); example3: a green triangle outline on a
wide 320 x 160 canvas.
"""
from __future__ import annotations

from pathlib import Path

from .scenes import COLOR_FAMILIES, render


def _shape(shape, color, center, extent=41, outline=0):
    return {"shape": shape, "color": color, "rgb": list(COLOR_FAMILIES[color]["pure"][1]), "center": list(center),
            "extent": extent, "outline": outline, "angle": 0.0, "aspect": 1.0}


def _scene(size, background, shapes):
    return {"size": list(size), "background": list(background), "noise": 0.0, "noise_seed": 0, "aa": False,
            "shapes": shapes}


EXAMPLES = {
    "example1.png": {
        "scene": _scene((112, 112), (240, 240, 235), [_shape("circle", "red", (28, 28)),
                                                      _shape("square", "blue", (84, 28)),
                                                      _shape("triangle", "yellow", (84, 84))]),
        "qa": [("How many shapes are there?", "There are 3 shapes."),
               ("What is in the top right?", "There is a blue square in the top right."),
               ("What color is the circle?", "The circle is red."),
               ("Is there a green triangle?", "No, there is no green triangle.")]},
    "example2.png": {
        "scene": _scene((224, 224), (255, 255, 255), [_shape("circle", "blue", (112, 112), extent=150)]),
        "qa": [("What shape is this?", "It is a circle."), ("What color is the shape?", "The shape is blue."),
               ("Describe the image.", "A blue circle.")]},
    "example3.png": {
        "scene": _scene((320, 160), (255, 255, 255), [_shape("triangle", "green", (240, 80), extent=100, outline=8)]),
        "qa": [("Where is the triangle?", "The triangle is on the right."),
               ("How many triangles are there?", "There is 1 triangle.")]},
}


def write_examples(directory: Path) -> list[Path]:
    """Render the EXAMPLES pictures into ``directory`` (PNG)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ex in EXAMPLES.items():
        path = directory / name
        render(ex["scene"]).save(path, format="PNG")
        paths.append(path)
    return paths
