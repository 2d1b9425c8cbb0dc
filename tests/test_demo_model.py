"""The bundled demo model (qwen2vl/demo/model): a real checkpoint layout, and >= 95% exact answers (greedy,
batched) on freshly generated held-out pictures, every answer a sentence; the bundled example images."""
import json

import pytest
import torch

from qwen2vl.demo import data
from qwen2vl.demo.train_demo import EVAL_SEED, EXAMPLES, TEST_SEED, TRAIN_SEED, accuracy_by_kind, answer_questions
from qwen2vl.loading import demo_model_path
from qwen2vl.model import Qwen2VLForConditionalGeneration
from qwen2vl.processing.media import load_image
from qwen2vl.processing.processor import Qwen2VLProcessor

MODEL = demo_model_path()
ASSETS = MODEL.parent / "assets"
N_HELD_OUT = 320


@pytest.fixture(scope="module")
def model():
    return Qwen2VLForConditionalGeneration.from_pretrained("qwen2vl-demo")


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained(MODEL)


def test_checkpoint_layout_and_load_by_name(model, processor):
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 2e7  # "a few million parameters"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "chat_template.json", "preprocessor_config.json"):
        assert (MODEL / name).is_file(), name
    tok = processor.tokenizer.convert_tokens_to_ids
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl" and cfg["tie_word_embeddings"]
    assert (cfg["image_token_id"], cfg["video_token_id"]) == (tok("<|image_pad|>"), tok("<|video_pad|>"))
    assert (cfg["vision_start_token_id"], cfg["vision_end_token_id"]) == (tok("<|vision_start|>"), tok("<|vision_end|>"))
    assert cfg.get("text_config", cfg)["vocab_size"] == 448 >= len(processor.tokenizer)
    gen = json.loads((MODEL / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok("<|im_end|>"), tok("<|endoftext|>")] and gen.get("do_sample") is False
    assert gen["pad_token_id"] == tok("<|endoftext|>")
    assert (MODEL / "model.safetensors").stat().st_size < 20 * 2**20  # a few MB


def test_processor_sees_demo_pictures_as_one_token_per_quadrant(processor):
    image = data.make_dataset(1, TEST_SEED)[0]["image"]
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 112 px shown at 56 px: 2x2 merged tokens
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 4


def test_held_out_accuracy_at_least_95_percent(model, processor):
    assert TEST_SEED not in (TRAIN_SEED, EVAL_SEED)
    test = data.make_dataset(N_HELD_OUT, TEST_SEED)
    answers = answer_questions(model, processor, test, batch_size=64)
    acc = accuracy_by_kind(test, answers)
    wrong = [(ex["question"], ex["answer"], a) for ex, a in zip(test, answers) if a.strip() != ex["answer"]]
    assert acc["all"] >= 0.95, (acc, wrong[:10])
    for a in answers:  # sentences: capitalised, ending with a full stop, several words
        assert a[:1].isupper() and a.endswith(".") and len(a.split()) >= 2, a


def test_batched_answers_equal_single_answers(model, processor):
    test = data.make_dataset(6, TEST_SEED + 1)
    batched = answer_questions(model, processor, test, batch_size=6)
    single = [answer_questions(model, processor, [ex], batch_size=1)[0] for ex in test]
    assert batched == single


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_bundled_examples(model, processor, name):
    image = load_image(str(ASSETS / name))
    assert image.size == (112, 112)
    examples = [{"image": image, "question": q, "answer": a} for q, a in EXAMPLES[name]["qa"]]
    with torch.no_grad():
        answers = answer_questions(model, processor, examples)
    assert answers == [a for _, a in EXAMPLES[name]["qa"]]


def test_alignment_targets_name_each_quadrant(processor):
    """The demo recipe's alignment loss: one target row per merged image token, in the vision tower's order
    (top left, top right, bottom left, bottom right), naming colour + shape (or "nothing") and the position."""
    from qwen2vl.demo.train_demo import AlignCollator, DemoDataset
    from qwen2vl.training.data import SFTCollator

    ds = DemoDataset(40, TEST_SEED)
    rec = next(ds[i] for i in range(len(ds)) if ds[i]["meta"]["shapes"] and ds[i]["meta"]["word"] is None)
    batch = AlignCollator(SFTCollator(processor))([rec])
    word = lambda w: processor.tokenizer.convert_tokens_to_ids("\u0120" + w)  # noqa: E731
    by_quadrant = {s["quadrant"]: s for s in rec["meta"]["shapes"]}
    expected = []
    for q in data.QUADRANTS:
        s = by_quadrant.get(q)
        what = [word(s["color"]), word(s["shape"])] if s else [word("nothing"), -100]
        expected.append(what + [word(w) for w in q.split()])
    assert data.QUADRANTS == ("top left", "top right", "bottom left", "bottom right")
    assert batch["aux_labels"].tolist() == expected
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 4
