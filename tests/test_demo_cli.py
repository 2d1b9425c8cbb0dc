"""The bundled demo model through the command line on pictures and clips made the way a user makes them: one big
shape in the middle of a white canvas in a paint program's colours, at 224x224 and 640x480; a clip of a circle
moving across, saved as MP4 (runs in-process through ``qwen2vl.cli.main``; two runs as real subprocesses)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwen2vl import cli
from tiny import write_mp4

ROOT = Path(__file__).resolve().parents[1]
PAINT = {"red": (237, 28, 36), "green": (34, 177, 76), "blue": (63, 72, 204), "yellow": (255, 242, 0)}  # MS Paint
SHAPES = ("circle", "square", "triangle")


def user_drawing(shape: str, color: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    r = 0.3 * min(w, h)
    cx, cy = w / 2, h / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PAINT[color])
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=PAINT[color])
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=PAINT[color])
    return img


@pytest.fixture(scope="module", autouse=True)
def load_once():
    """The in-process runs share one loaded model (each still goes through argument parsing, message building,
    the processor and streamed generation); loading itself is covered by the subprocess test."""
    real, cache = cli._load, {}

    def cached(args):
        if args.model not in cache:
            cache[args.model] = real(args)
        return cache[args.model]

    cli._load = cached
    yield
    cli._load = real


# The bundled model misses some of these (measured: the 640x480 drawings all right, 3 of the 224x224 ones wrong):
# a hard floor at the shipped model's level, then xfail below the target.
MAX_WRONG = {(224, 224): 3, (640, 480): 0}  # of 12 (measured: 3 and 0)


def run_inprocess(capsys, *args) -> str:
    assert cli.main(["run", *args]) == 0
    return capsys.readouterr().out.strip()


def words(text: str) -> set[str]:
    return set(text.lower().replace(".", " ").replace(",", " ").split())


@pytest.mark.parametrize("size", [(224, 224), (640, 480)])
def test_user_drawings_each_shape_and_color(tmp_path, capsys, size):
    wrong = []
    for shape in SHAPES:
        for color in PAINT:
            path = tmp_path / f"{shape}_{color}.png"
            user_drawing(shape, color, size).save(path)
            got = {q: run_inprocess(capsys, "--image", str(path), q)
                   for q in ("What shape is this?", "What color is the shape?", "Describe the image.")}
            named = words(" ".join(got.values()))
            if shape not in words(got["What shape is this?"]) or color not in words(got["What color is the shape?"]) \
                    or not {shape, color} <= words(got["Describe the image."]) or named & (set(SHAPES) - {shape}) \
                    or named & (set(PAINT) - {color}):
                wrong.append((shape, color, got))
    assert len(wrong) <= MAX_WRONG[size], wrong
    if wrong:
        pytest.xfail(f"{len(wrong)} of {len(SHAPES) * len(PAINT)} drawings answered wrongly (issue #18's target: none)")


def moving_circle(direction: str, n: int = 16, size=(160, 120)) -> np.ndarray:
    w, h = size
    frames = []
    for i in range(n):
        img = Image.new("RGB", size, "white")
        f = i / (n - 1)
        x = 30 + (w - 60) * (f if direction == "right" else 1 - f)
        ImageDraw.Draw(img).ellipse([x - 22, h / 2 - 22, x + 22, h / 2 + 22], fill=PAINT["red"])
        frames.append(np.asarray(img))
    return np.stack(frames)


def test_video_clip_direction(tmp_path, capsys):
    right = []
    for direction in ("left", "right"):
        clip = tmp_path / f"{direction}.mp4"
        write_mp4(clip, moving_circle(direction))
        out = run_inprocess(capsys, "--video", str(clip), "Which way does the circle move?")
        right.append(direction in words(out) and ({"left", "right"} - {direction}).isdisjoint(words(out)))
    assert all(right), right  # both directions named (the model before 2026-12-06 named one of the two)


def _subprocess(*args):
    return subprocess.run([sys.executable, "-m", "qwen2vl", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_subprocess_user_drawing_and_video(tmp_path):
    pic = tmp_path / "drawing.png"
    user_drawing("triangle", "green", (640, 480)).save(pic)
    out = _subprocess("run", "--image", str(pic), "What color is the triangle?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The triangle is green."
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, moving_circle("right"))
    out = _subprocess("run", "--video", str(clip), "--json", "Which way does the circle move?")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    # the video path end to end; whether the direction is right is test_video_clip_direction's (below target)
    assert rec["answer"] in ("The circle moves to the right.", "The circle moves to the left."), rec["answer"]
    assert rec["prompt_tokens"] > 12  # 2 temporal patches x 6 merged tokens of the 4 sampled frames + the template
