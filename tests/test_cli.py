"""`qwen2vl` command line on the bundled demo model and example images (subprocesses, as a user runs it).

test_run_streams_the_correct_answer is the README's main job."""
import json
import subprocess
import sys
from pathlib import Path


ASSETS = Path(__file__).resolve().parents[1] / "qwen2vl" / "demo" / "assets"
EXAMPLE1 = ASSETS / "example1.png"  # red circle, blue square, yellow triangle (see qwen2vl/demo/train_demo.EXAMPLES)


def qwen2vl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen2vl", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_run_streams_the_correct_answer():
    out = qwen2vl("run", "--image", str(EXAMPLE1), "How many shapes are there?")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "There are 3 shapes.\n"


def test_run_json_record():
    out = qwen2vl("run", "--image", str(EXAMPLE1), "--json", "What color is the circle?")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["answer"] == "The circle is red."
    assert rec["prompt_tokens"] > 4 and rec["completion_tokens"] >= 5  # 4 image tokens + template; answer + eos
    for key in ("load_s", "ttft_s", "total_s", "tokens_per_s"):
        assert rec[key] >= 0, key
    assert rec["ttft_s"] <= rec["total_s"]


def test_bad_image_is_one_line_without_traceback(tmp_path):
    # (missing files / models are covered on a tiny model in test_cli_basics.py)
    bad = tmp_path / "broken.png"
    bad.write_text("this is not a picture")
    out = qwen2vl("run", "--image", str(bad), "How many shapes are there?")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen2vl: error:") and "broken.png" in lines[0], out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = qwen2vl("run", "--debug", "--image", str(tmp_path / "nope.png"), "Hi")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_chat_two_turns_about_an_image():
    script = f"/image {EXAMPLE1}\nHow many shapes are there?\nWhat color is the circle?\n/exit\n"
    out = qwen2vl("chat", stdin=script)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line and not line.startswith("(")]
    assert lines == ["There are 3 shapes.", "The circle is red."]


def test_python_dash_m_help():
    out = qwen2vl("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("run", "chat", "train", "serve"))
