"""The transformers PreTrainedModel surface on every public model class, checked against transformers 5.24 on the
same tiny weights: IO across frameworks, base model into the CG class with a fresh head, embeddings, resizing,
gradient checkpointing, input-require-grads, parameter counts, generation_config, config.get_text_config, and
the processors' to_dict / to_json_file round trip."""
import json

import pytest
import torch

from qwen2vl import (Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLModel, Qwen2VLTextModel,
                     Qwen2VLVideoProcessor)
from qwen2vl.configuration import Qwen2VLTextConfig
from qwen2vl.model import Qwen2VisionTransformerPretrainedModel
from tiny import oracle_from, tiny_model

transformers = pytest.importorskip("transformers")

OURS = {"cg": Qwen2VLForConditionalGeneration, "base": Qwen2VLModel, "text": Qwen2VLTextModel,
        "vision": Qwen2VisionTransformerPretrainedModel}
THEIRS = {"cg": "Qwen2VLForConditionalGeneration", "base": "Qwen2VLModel", "text": "Qwen2VLTextModel",
          "vision": "Qwen2VisionTransformerPretrainedModel"}


def _part(model, kind):
    return {"cg": model, "base": model.model, "text": model.model.language_model, "vision": model.model.visual}[kind]


def _hf_cls(kind):
    import transformers.models.qwen2_vl.modeling_qwen2_vl as ref

    return getattr(ref, THEIRS[kind])


@pytest.fixture(scope="module")
def pair():
    model = tiny_model(tie=False)
    return model, oracle_from(model)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if "inv_freq" not in k}
    sb = {k: v.reshape(sa[k].shape) for k, v in sb.items() if "inv_freq" not in k}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", list(OURS))
def test_each_class_saves_loads_and_crosses_frameworks(pair, kind, tmp_path):
    ours, hf = (_part(m, kind) for m in pair)
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "hf").iterdir())  # generation_config.json with the CG only
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == [THEIRS[kind]] and cfg["model_type"] == hf.config.model_type
    assert _same_weights(ours, OURS[kind].from_pretrained(tmp_path / "ours"))
    assert _same_weights(ours, OURS[kind].from_pretrained(tmp_path / "hf"))
    assert _same_weights(hf, _hf_cls(kind).from_pretrained(tmp_path / "ours"))


def test_base_model_loads_into_cg_class_with_fresh_head(pair, tmp_path):
    ours, hf = pair
    ours.model.save_pretrained(tmp_path)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    _, ref_info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set(ref_info["missing_keys"]) == {"lm_head.weight"}
    assert _same_weights(ours.model, model.model)
    assert 0.01 < model.lm_head.weight.std().item() < 0.03  # normal(0, initializer_range), not zeros or garbage
    assert model.generation_config is not None


def test_attributes_and_counts_match_reference(pair):
    ours, hf = pair
    for kind in ("cg", "base", "text"):
        o, r = _part(ours, kind), _part(hf, kind)
        assert type(o.base_model).__name__ == type(r.base_model).__name__
        assert o.main_input_name == r.main_input_name
        assert o.supports_gradient_checkpointing and r.supports_gradient_checkpointing
        assert (o.get_output_embeddings() is None) == (r.get_output_embeddings() is None)
        assert type(o.config.get_text_config()).__name__ == type(r.config.get_text_config()).__name__
        for kw in ({}, {"only_trainable": True}, {"exclude_embeddings": True}):
            assert o.num_parameters(**kw) == r.num_parameters(**kw), (kind, kw)
    assert ours.visual.get_input_embeddings() is ours.visual.patch_embed
    assert tiny_model().num_parameters() == oracle_from(tiny_model()).num_parameters()  # tied head counted once


def test_generation_config_always_present_and_saved(tmp_path):
    model = tiny_model()
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings_like_reference(tie):
    ours = tiny_model(tie=tie)
    hf = oracle_from(ours)
    old = ours.get_input_embeddings().weight.detach().clone()
    for n, mult in ((120, None), (90, 16)):
        e, r = ours.resize_token_embeddings(n, pad_to_multiple_of=mult), hf.resize_token_embeddings(n, mult)
        assert e.weight.shape == r.weight.shape
        assert ours.config.text_config.vocab_size == hf.config.text_config.vocab_size == e.num_embeddings
        assert ours.lm_head.weight.shape == hf.lm_head.weight.shape
        assert (ours.lm_head.weight is e.weight) == tie
        k = min(old.shape[0], e.num_embeddings)
        assert torch.equal(e.weight[:k], old[:k])
    ids = torch.tensor([[7, 95, 8]])
    assert ours(input_ids=ids).logits.shape == (1, 3, 96)


def test_set_input_embeddings_reaches_the_decoder():
    model = tiny_model()
    new = torch.nn.Embedding(99, model.config.text_config.hidden_size)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.model.language_model.embed_tokens is new


def test_gradient_checkpointing_kwargs_and_same_gradients():
    model = tiny_model()
    model.train()
    ids = torch.randint(7, 90, (2, 9))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing and model.model.language_model.gradient_checkpointing
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"bogus": 1})


def test_enable_input_require_grads_with_frozen_model():
    model = tiny_model()
    model.requires_grad_(False)
    seen = []
    model.model.language_model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].requires_grad))
    model.enable_input_require_grads()
    model(input_ids=torch.tensor([[7, 8, 9]]), use_cache=False)
    model.disable_input_require_grads()
    model(input_ids=torch.tensor([[7, 8, 9]]), use_cache=False)
    assert seen == [True, False]


def test_text_config_loads_out_of_a_full_config(pair, tmp_path):
    pair[0].save_pretrained(tmp_path)
    text = Qwen2VLTextConfig.from_pretrained(tmp_path)
    assert text.to_dict() == pair[0].config.text_config.to_dict()


@pytest.mark.parametrize("cls", [Qwen2VLImageProcessor, Qwen2VLVideoProcessor])
def test_processor_to_dict_to_json_file_round_trip(cls, tmp_path):
    proc = cls(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, merge_size=2)
    proc.to_json_file(tmp_path / "p.json")
    again = cls.from_json_file(tmp_path / "p.json")
    assert again.to_dict() == proc.to_dict() and json.loads((tmp_path / "p.json").read_text()) == proc.to_dict()
    proc.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).to_dict() == proc.to_dict()
    if cls is Qwen2VLVideoProcessor:
        return  # the reference's video processor needs torchvision, not installed here
    ref = transformers.Qwen2VLImageProcessor.from_pretrained(tmp_path)
    assert ref.size == proc.size and list(ref.image_mean) == list(proc.image_mean)
