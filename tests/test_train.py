"""Fine-tuning (qwen2vl.train) on a tiny random model with the demo tokenizer: label masking, one step reduces
the loss, freezing, gradient accumulation, LR schedule, the `qwen2vl train` command."""
import copy
import json
import math

import pytest
import torch
from PIL import Image

from qwen2vl.configuration import Qwen2VLConfig
from qwen2vl.demo import data
from qwen2vl.demo.build_tokenizer import save_demo_tokenizer
from qwen2vl.model import Qwen2VLForConditionalGeneration
from qwen2vl.processing.processor import Qwen2VLProcessor
from qwen2vl.train import IGNORE_INDEX, SFTCollator, Trainer, TrainingArguments, load_jsonl, lr_factor, main

PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12544, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}


def tiny_demo_config(ids: dict) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=dict(vocab_size=ids["model_vocab_size"], hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, tie_word_embeddings=True,
                         bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         pad_token_id=ids["pad_token_id"]),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-demo")
    ids = save_demo_tokenizer(d, n_texts=500)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(tiny_demo_config(ids)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def processor(model_dir):
    return Qwen2VLProcessor.from_pretrained(model_dir)


def fresh_model(model_dir):
    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype="float32")


def records(n: int, seed: int = 3):
    out = []
    for ex in data.make_dataset(n, seed):
        out.append({"messages": data.to_messages(ex["question"], ex["answer"], ex["image"])})
    return out


def multi_turn_record():
    img = data.make_dataset(1, 5)[0]["image"]
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "There are 2 shapes."}]},
        {"role": "user", "content": "And circles?"},
        {"role": "assistant", "content": "There is 1 circle."},
    ]}


def expected_labels(processor, text: str, answers: list[str]) -> list[int]:
    """Token by token: a token is trained on iff its characters lie inside an assistant answer or its <|im_end|>."""
    spans, start = [], 0
    for a in answers:
        i = text.index("<|im_start|>assistant\n" + a, start) + len("<|im_start|>assistant\n")
        spans.append((i, i + len(a) + len("<|im_end|>")))
        start = spans[-1][1]
    enc = processor.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return [tid if any(a <= s and e <= b for a, b in spans) else IGNORE_INDEX
            for tid, (s, e) in zip(enc.ids, enc.offsets)]


def test_labels_mask_exactly_the_non_assistant_tokens(processor):
    recs = [multi_turn_record(), records(1)[0]]
    collator = SFTCollator(processor)
    batch = collator(recs)
    answers = [["There are 2 shapes.", "There is 1 circle."], [recs[1]["messages"][1]["content"][0]["text"]]]
    for row, rec in enumerate(recs):
        text = processor.apply_chat_template(rec["messages"], tokenize=False)
        n_img = text.count("<|image_pad|>")
        if n_img:  # the picture's placeholder expands to one token per merged patch
            img_rows = [i for i, r in enumerate(recs) if "<|image_pad|>" in processor.apply_chat_template(
                r["messages"], tokenize=False)]
            n_tok = int(batch["image_grid_thw"][img_rows.index(row)].prod()) // 4
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tok)
        want = expected_labels(processor, text, answers[row])
        mask = batch["attention_mask"][row].bool()
        got = batch["labels"][row][mask].tolist()
        assert batch["input_ids"][row][mask].tolist() == processor.tokenizer.backend_tokenizer.encode(
            text, add_special_tokens=False).ids
        assert got == want
        assert (batch["labels"][row][~mask] == IGNORE_INDEX).all()  # padding is never trained on
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (batch["labels"] == im_end).sum() == 3  # one end token per assistant turn


def test_one_step_reduces_the_loss_on_a_fixed_batch(model_dir, processor):
    model = fresh_model(model_dir)
    recs = records(4)
    batch = SFTCollator(processor)(recs)
    with torch.no_grad():
        before = float(model(**batch).loss)
    args = TrainingArguments(max_steps=1, per_device_train_batch_size=4, learning_rate=3e-3, progress=False,
                             device="cpu")
    Trainer(model, processor, args, recs).train()
    with torch.no_grad():
        after = float(model(**batch).loss)
    assert after < before - 1e-3, (before, after)


@pytest.mark.parametrize("frozen", [False, True])
def test_vision_tower_gets_gradients_unless_frozen(model_dir, processor, frozen):
    from qwen2vl.train import freeze

    model = fresh_model(model_dir).train()
    freeze(model, vision_tower=frozen)
    batch = SFTCollator(processor)(records(2))
    model(**batch).loss.backward()
    vit = [model.model.visual.patch_embed.proj.weight, *model.model.visual.blocks.parameters()]
    if frozen:
        assert all(not p.requires_grad and p.grad is None for p in vit)
    else:
        assert all(p.grad is not None for p in vit) and float(vit[0].grad.abs().sum()) > 0
    merger = list(model.model.visual.merger.parameters())  # still trained: its gradient flows from the LM
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in merger)
    assert float(model.lm_head.weight.grad.abs().sum()) > 0


def test_freeze_merger_and_language_model(model_dir):
    from qwen2vl.train import freeze

    model = fresh_model(model_dir)
    freeze(model, merger=True, language_model=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.visual.") and ".merger." not in n for n in trainable)


def test_gradient_accumulation_matches_the_big_batch(model_dir, processor):
    recs = records(2, seed=11)
    params = []
    for bs, accum in ((2, 1), (1, 2)):
        model = fresh_model(model_dir)
        args = TrainingArguments(max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
                                 learning_rate=1e-2, max_grad_norm=0.0, progress=False, device="cpu")
        Trainer(model, processor, args, recs).train()
        params.append(model.state_dict())
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], atol=2e-5, rtol=1e-4, msg=k)


def test_lr_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0
    assert math.isclose(lr_factor(100, 100, 0, "linear"), 0.0, abs_tol=1e-12)


def test_evaluate_reports_loss_and_accuracies(model_dir, processor):
    model = fresh_model(model_dir)
    args = TrainingArguments(per_device_eval_batch_size=3, eval_generate=True, eval_max_new_tokens=4, progress=False,
                             device="cpu")
    metrics = Trainer(model, processor, args, eval_dataset=records(3)).evaluate()
    assert set(metrics) == {"loss", "token_accuracy", "sequence_accuracy", "exact_match"}
    assert metrics["loss"] > 0 and 0 <= metrics["token_accuracy"] <= 1 and metrics["exact_match"] == 0.0


def test_train_command_on_jsonl(model_dir, tmp_path, capsys):
    path = data.write_jsonl(str(tmp_path / "train.jsonl"), 4, seed=9)
    recs = load_jsonl(path)
    img = recs[0]["messages"][0]["content"][0]["image"]
    assert img.startswith(str(tmp_path))  # resolved against the file
    assert Image.open(img).size == data.make_dataset(1, seed=9)[0]["image"].size
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", path, "--eval-data", path, "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--save-steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["tokens_per_s"] > 0 and "loss" in result["eval"]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    assert (out / "checkpoint-1" / "model.safetensors").exists()
    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(out)
    trained = copy.deepcopy(reloaded.state_dict())
    original = fresh_model(model_dir).state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)
