"""The Transformers Qwen2-VL page's examples, run with `from qwen2vl import ...` in place of the transformers
imports, on a small random model saved to a temp folder with the real tokenizer/processor files of
Qwen2-VL-2B-Instruct. The model is random, so the assertions check shapes, trimming and decoding, plus the
exact prompts the processor builds."""
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from paths import QWEN2VL_2B
from qwen2vl import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

REAL = QWEN2VL_2B


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2vl-small")
    real = Qwen2VLConfig.from_pretrained(REAL)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=real.text_config.vocab_size, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, spatial_merge_size=2),
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(d)
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
                 "generation_config.json", "preprocessor_config.json"):
        shutil.copy(REAL / name, d / name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(d / "demo.jpg")
    Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(d / "small.png")
    with av.open(str(d / "video.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype="auto", device_map="auto")


def _generate_and_trim(model, processor, inputs, n=8):
    output_ids = model.generate(**inputs, max_new_tokens=n)
    generated_ids = [out[len(inp):] for inp, out in zip(inputs.input_ids, output_ids)]
    text = processor.batch_decode(generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert output_ids.shape[0] == inputs.input_ids.shape[0]
    assert output_ids.shape[1] <= inputs.input_ids.shape[1] + n
    assert torch.equal(output_ids[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    return text


def test_single_image_inference(model, model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    conversation = [{"role": "user", "content": [{"type": "image", "url": str(model_dir / "demo.jpg")},
                                                 {"type": "text", "text": "Describe this image."}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    assert inputs.input_ids[0, :15].tolist() == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645,
                                                 198, 151644, 872, 198, 151652]
    text = _generate_and_trim(model, processor, inputs)
    assert isinstance(text, list) and len(text) == 1 and isinstance(text[0], str)


def test_video_inference(model, model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    conversation = [{"role": "user", "content": [{"type": "video", "path": str(model_dir / "video.mp4")},
                                                 {"type": "text", "text": "What happened in the video?"}]}]
    inputs = processor.apply_chat_template(conversation, fps=2, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    # 12 frames at 4 fps = 3 s; fps=2 → 6 frames → 3 temporal patches.
    assert inputs.video_grid_thw[0, 0].item() == 3
    _generate_and_trim(model, processor, inputs)


def test_batch_mixed_media_inference(model, model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    conversation1 = [{"role": "user", "content": [{"type": "image", "path": str(model_dir / "demo.jpg")},
                                                  {"type": "text", "text": "Describe this image."}]}]
    conversation2 = [{"role": "user", "content": [{"type": "image", "path": str(model_dir / "small.png")},
                                                  {"type": "video", "path": str(model_dir / "video.mp4")},
                                                  {"type": "text", "text": "What is happening?"}]}]
    conversation3 = [{"role": "assistant", "content": [{"type": "text", "text": "I am a helpful assistant."}]},
                     {"role": "user", "content": [{"type": "text", "text": "Who are you?"}]}]
    conversations = [conversation1, conversation2, conversation3]
    inputs = processor.apply_chat_template(conversations, fps=1, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, padding=True, return_tensors="pt").to(model.device)
    assert inputs.input_ids.shape[0] == 3 and inputs.image_grid_thw.shape[0] == 2
    assert (inputs.attention_mask[:, -1] == 1).all()  # left padded
    text = _generate_and_trim(model, processor, inputs)
    assert len(text) == 3
    # Each sample of the batch gets the tokens it gets alone (greedy).
    alone = processor.apply_chat_template([conversation3], add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    assert _generate_and_trim(model, processor, alone) == text[2:]


def test_min_max_pixels(model, model_dir):
    min_pixels, max_pixels = 56 * 56, 56 * 56 * 2
    processor = AutoProcessor.from_pretrained(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(model_dir / "demo.jpg")},
                                                 {"type": "text", "text": "Describe this image."}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    h, w = inputs.image_grid_thw[0, 1:].tolist()
    assert min_pixels <= h * w * 14 * 14 <= max_pixels
    _generate_and_trim(model, processor, inputs)


def test_multiple_images_with_vision_ids(model, model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    conversation = [
        {"role": "user", "content": [{"type": "image", "path": str(model_dir / "small.png")},
                                     {"type": "text", "text": "Hello, how are you?"}]},
        {"role": "assistant", "content": "I'm doing well, thank you for asking. How can I assist you today?"},
        {"role": "user", "content": [{"type": "text", "text": "Can you describe these images?"},
                                     {"type": "image", "path": str(model_dir / "demo.jpg")},
                                     {"type": "image", "path": str(model_dir / "small.png")}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Hello" in prompt
    assert "Picture 3: <|vision_start|><|image_pad|><|vision_end|><|im_end|>" in prompt
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, add_vision_id=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs.image_grid_thw.shape[0] == 3
    _generate_and_trim(model, processor, inputs)
