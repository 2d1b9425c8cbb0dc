"""Chat-template rendering: the official Qwen2-VL template, exact strings, oracle parity, sandboxing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen2vl.processing.chat_template import collect_media, normalize_conversations, render_chat_template
from qwen2vl.processing.processor import Qwen2VLProcessor
from qwen2vl.processing.tokenizer import AutoTokenizer
from paths import QWEN2VL_2B

CKPT = QWEN2VL_2B
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason="Qwen2-VL-2B metadata not available")

# The Transformers Qwen2-VL docs "Multiple Image Inputs" example.
DOCS_CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}]},
    {"role": "assistant", "content": "I'm doing well, thank you for asking. How can I assist you today?"},
    {"role": "user", "content": [
        {"type": "text", "text": "Can you describe these images and video?"}, {"type": "image"}, {"type": "image"},
        {"type": "video"}, {"type": "text", "text": "These are from my vacation."}]},
    {"role": "assistant", "content": "I'm glad to hear you had a great vacation! Let me describe the images and video for you."},
    {"role": "user", "content": "It was a trip to the mountains. Can you see the details in the images and video?"},
]
DOCS_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
    "<|vision_end|>Hello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing well, thank you for asking. How can "
    "I assist you today?<|im_end|>\n<|im_start|>user\nCan you describe these images and video?<|vision_start|>"
    "<|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
    "These are from my vacation.<|im_end|>\n<|im_start|>assistant\nI'm glad to hear you had a great vacation! Let me "
    "describe the images and video for you.<|im_end|>\n<|im_start|>user\nIt was a trip to the mountains. Can you see "
    "the details in the images and video?<|im_end|>\n<|im_start|>assistant\n"
)
DOCS_EXPECTED_VISION_ID = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|>"
    "<|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing well, thank you for "
    "asking. How can I assist you today?<|im_end|>\n<|im_start|>user\nCan you describe these images and video?"
    "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Picture 3: <|vision_start|><|image_pad|><|vision_end|>"
    "Video 1: <|vision_start|><|video_pad|><|vision_end|>These are from my vacation.<|im_end|>\n<|im_start|>assistant\n"
    "I'm glad to hear you had a great vacation! Let me describe the images and video for you.<|im_end|>\n"
    "<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and video?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE = json.loads((CKPT / "chat_template.json").read_text())["chat_template"]


@pytest.fixture(scope="module")
def proc():
    # Rendering needs only the tokenizer and the template.
    return Qwen2VLProcessor(tokenizer=AutoTokenizer.from_pretrained(CKPT), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def ref_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(CKPT))


def _oracle(ref_tok, conv, **kw):
    return ref_tok.apply_chat_template(conv, chat_template=TEMPLATE, tokenize=False, **kw)


@pytest.mark.parametrize("vision_id,expected", [(False, DOCS_EXPECTED), (True, DOCS_EXPECTED_VISION_ID)])
def test_docs_example_exact(proc, ref_tok, vision_id, expected):
    out = proc.apply_chat_template(DOCS_CONVERSATION, add_generation_prompt=True, add_vision_id=vision_id)
    assert out == expected
    assert _oracle(ref_tok, DOCS_CONVERSATION, add_generation_prompt=True, add_vision_id=vision_id) == expected


def test_reference_examples(proc):
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert proc.apply_chat_template(one, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
        "<|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                         {"type": "text", "text": "Compare."}]},
            {"role": "assistant", "content": "OK"}]
    assert proc.apply_chat_template(conv, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|>"
        "<|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>Video 1: <|vision_start|><|video_pad|>"
        "<|vision_end|>Compare.<|im_end|>\n<|im_start|>assistant\nOK<|im_end|>\n")


@pytest.mark.parametrize("conv,kw", [
    ([{"role": "user", "content": "hi"}], {"add_generation_prompt": True}),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a\n\n b "}]}], {}),
    ([{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "Roses are red, "}],
     {"continue_final_message": True}),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": "The answer"}]}],
     {"continue_final_message": True}),
    ([{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "t"}]}],
     {"add_generation_prompt": True, "add_vision_id": True}),
])
def test_oracle_parity(proc, ref_tok, conv, kw):
    assert proc.apply_chat_template(conv, **kw) == _oracle(ref_tok, conv, **kw)


def test_continue_final_message(proc):
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Partial answer"}]
    assert proc.apply_chat_template(conv, continue_final_message=True).endswith("assistant\nPartial answer")
    with pytest.raises(ValueError, match="not compatible"):
        proc.apply_chat_template(conv, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="could not find any text"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], continue_final_message=True)


def test_batched_and_openai_blocks(proc):
    convs = [[{"role": "user", "content": "a"}],
             [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}},
                                           {"type": "video_url", "video_url": {"url": "v.mp4"}},
                                           {"type": "text", "text": "b"}]}]]
    out = proc.apply_chat_template(convs, add_generation_prompt=True)
    assert isinstance(out, list) and len(out) == 2
    assert out[0] == proc.apply_chat_template(convs[0], add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>b" in out[1]


def test_media_collection_and_per_item_options():
    img = Image.new("RGB", (8, 8))
    convs, batched = normalize_conversations([
        {"role": "user", "content": [
            {"type": "image", "image": img, "max_pixels": 3136}, {"type": "image_url", "image_url": {"url": "u.png"}},
            {"type": "video", "video": "v.mp4", "fps": 1.0}, {"type": "video", "path": "w.mp4", "nframes": 4},
            {"type": "image"}, {"type": "text", "text": "t"}]}, {"role": "assistant", "content": None}])
    assert not batched and "content" not in convs[0][1]  # None-valued keys are dropped
    images, videos, image_opts, video_opts = collect_media(convs)
    assert images == [img, "u.png"] and videos == ["v.mp4", "w.mp4"]
    assert image_opts == [{"max_pixels": 3136}, {}]
    assert video_opts == [{"fps": 1.0, "do_sample_frames": True}, {"num_frames": 4, "do_sample_frames": True}]
    with pytest.raises(ValueError, match="mutually exclusive"):
        collect_media([[{"role": "user", "content": [{"type": "video", "video": "v", "fps": 1, "nframes": 4}]}]])


def test_template_sees_only_plain_data(proc):
    # Decoded media objects never reach the sandbox: the template only sees an inert string.
    probe = "{% for m in messages %}{{ m['content'][0]['image'] }}|{{ m['content'][0]['image'].__class__ }}{% endfor %}"
    img = Image.new("RGB", (4, 4))
    out = render_chat_template(probe, [[{"role": "user", "content": [{"type": "image", "image": img}]}]])
    assert out == ["<object>|"]  # dunder access is undefined in the sandbox
    arr = np.zeros((2, 2, 3), np.uint8)
    assert proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": arr}]}]) == \
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])


def test_sandbox_and_helpers():
    conv = [[{"role": "user", "content": "<b>&"}]]
    with pytest.raises(ValueError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", conv)
    with pytest.raises(ValueError):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", conv)
    with pytest.raises(ValueError):
        render_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}", conv)
    with pytest.raises(ValueError):  # immutable sandbox: no list mutation
        render_chat_template("{% set l = [] %}{{ l.append(1) }}", conv)
    assert render_chat_template("{{ messages[0]['content'] | tojson }}", conv) == ['"<b>&"']
    trimmed = render_chat_template("{% for m in messages %}\n  {% if 1 %}{{ m['role'] }}{% endif %}\n{% endfor %}", conv)
    assert trimmed == ["user"]  # trim_blocks + lstrip_blocks
    assert render_chat_template("{% generation %}{{ eos }}{% endgeneration %}", conv, eos="E") == ["E"]
    with pytest.raises(ValueError, match="Invalid chat template"):
        render_chat_template("{% for %}", conv)
    with pytest.raises(ValueError, match="non-empty"):
        normalize_conversations([])


def test_template_kwargs_and_special_tokens(proc):
    tpl = "{{ eos_token }}{{ pad_token }}{% if flag %}F{% endif %}"
    conv = [{"role": "user", "content": "x"}]
    assert proc.apply_chat_template(conv, chat_template=tpl, flag=True) == "<|im_end|><|endoftext|>F"
    # kwargs the template does not read are processor kwargs: harmless when not tokenizing
    assert proc.apply_chat_template(conv, chat_template=tpl, max_pixels=100) == "<|im_end|><|endoftext|>"
    with pytest.raises(ValueError, match="mutually exclusive"):
        proc.apply_chat_template(conv, fps=1, num_frames=4)


def test_tokenizer_apply_chat_template_parity(proc, ref_tok):
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    ids = proc.tokenizer.apply_chat_template(conv, add_generation_prompt=False)
    ref = ref_tok.apply_chat_template(conv, chat_template=TEMPLATE, tokenize=True, return_dict=False)
    assert ids == (ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)
    assert proc.tokenizer.apply_chat_template(conv, tokenize=False) == _oracle(ref_tok, conv)
