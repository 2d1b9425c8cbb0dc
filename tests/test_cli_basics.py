"""`qwen2vl` CLI mechanics on a tiny random model (the demo model's answers are tested in test_cli.py)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_docs_examples import model_dir  # noqa: F401  (fixture: tiny model + real tokenizer files)


def qwen2vl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen2vl", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def image(model_dir):  # noqa: F811
    path = model_dir / "cli.png"
    Image.fromarray(np.full((56, 84, 3), 200, dtype=np.uint8)).save(path)
    return path


def test_run_json_record(model_dir, image):  # noqa: F811
    out = qwen2vl("run", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "4", "--json", "Hi")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rec) >= {"answer", "prompt_tokens", "completion_tokens", "ttft_s", "total_s", "tokens_per_s", "load_s"}
    assert 1 <= rec["completion_tokens"] <= 4 and rec["prompt_tokens"] > 10


def test_run_streams_the_same_answer_as_generate(model_dir, image):  # noqa: F811
    from qwen2vl import AutoProcessor, Qwen2VLForConditionalGeneration

    out = qwen2vl("run", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "6", "Hi")
    assert out.returncode == 0, out.stderr
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    proc = AutoProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Hi"}]}]
    inputs = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out.stdout == expected + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--image", "/no/such/file.png"], "/no/such/file.png"),
    (["--model", "/no/such/model"], "model not found"),
])
def test_errors_are_one_line_without_traceback(model_dir, argv, message):  # noqa: F811
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    out = qwen2vl("run", *argv, "Hi")
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_chat_keeps_history_and_images(model_dir, image):  # noqa: F811
    script = f"/image {image}\nhello\nand again\n/reset\nafter reset\n/exit\n"
    out = qwen2vl("chat", "--model", str(model_dir), "--max-new-tokens", "3", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "(image added:" in out.stdout and "(history cleared)" in out.stdout
    bad = qwen2vl("chat", "--model", str(model_dir), stdin="/image /no/file.png\n/exit\n")
    assert bad.returncode == 0 and "/no/file.png" in bad.stderr
