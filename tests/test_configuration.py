"""Tests for qwen2vl.configuration against the transformers oracle and the shared real hub configs."""
import json
from pathlib import Path

import pytest

from qwen2vl.configuration import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "qwen2-vl"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/qwen2-vl")
REAL = {n: SHARED / f"Qwen2-VL-{n}-Instruct" for n in ("2B", "7B")}

TEXT_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "use_cache", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
               "attention_dropout", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id"]
VISION_FIELDS = ["depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels",
                 "patch_size", "spatial_merge_size", "temporal_patch_size", "initializer_range", "rope_parameters"]
TOP_FIELDS = ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
              "tie_word_embeddings", "architectures", "model_type", "vision_token_id"]


def _tf():
    return pytest.importorskip("transformers")


def _tiny_dict(**over):
    d = {"text_config": {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
         "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64}}
    d.update(over)
    return d


def assert_same_as_oracle(ours, theirs):
    for f in TOP_FIELDS:
        assert getattr(ours, f, "<absent>") == getattr(theirs, f, "<absent>"), f
    assert str(theirs.dtype).replace("torch.", "") == str(ours.dtype)
    for f in TEXT_FIELDS:
        assert getattr(ours.text_config, f) == getattr(theirs.text_config, f), f
    for f in VISION_FIELDS:
        assert getattr(ours.vision_config, f) == getattr(theirs.vision_config, f), f
    assert ours.text_config.head_dim == theirs.text_config.hidden_size // theirs.text_config.num_attention_heads
    assert ours.text_config.mrope_section == theirs.text_config.rope_parameters["mrope_section"]


@pytest.mark.parametrize("size", ["2B", "7B"])
def test_real_configs_match_oracle(size):
    tf = _tf()
    ours = Qwen2VLConfig.from_pretrained(REAL[size])
    theirs = tf.Qwen2VLConfig.from_pretrained(REAL[size])
    assert_same_as_oracle(ours, theirs)
    t, v = ours.text_config, ours.vision_config
    assert t.rms_norm_eps == 1e-6 and t.rope_theta == 1e6 and t.mrope_section == [16, 24, 24]
    assert t.head_dim == 128 and v.head_dim == 80 and v.in_channels == 3 and v.patch_size == 14
    assert ours.dtype == "bfloat16" and ours.attn_implementation == "sdpa"
    assert ours.vocab_size == t.vocab_size and ours.hidden_size == t.hidden_size == v.hidden_size
    if size == "2B":
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.vocab_size, t.intermediate_size) == (1536, 28, 12, 2, 151936, 8960)
        assert ours.tie_word_embeddings is True
    else:
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.vocab_size, t.intermediate_size) == (3584, 28, 28, 4, 152064, 18944)
        assert ours.tie_word_embeddings is False
    assert ours.vision_token_id == 151654  # unknown key kept


def test_from_file_path_and_roundtrip_dict():
    c = Qwen2VLConfig.from_pretrained(REAL["2B"] / "config.json")
    d = c.to_dict()
    assert d["model_type"] == "qwen2_vl" and d["text_config"]["model_type"] == "qwen2_vl_text"
    assert d["vision_config"]["model_type"] == "qwen2_vl_vision"
    assert d["text_config"]["rope_parameters"]["mrope_section"] == [16, 24, 24]
    c2 = Qwen2VLConfig.from_dict(d)
    assert c2 == c and c2.to_dict() == d
    assert json.loads(c.to_json_string()) == json.loads(json.dumps(d))
    assert "Qwen2VLConfig" in repr(c)


@pytest.mark.parametrize("size", ["2B", "7B"])
def test_ours_saved_loads_in_transformers(tmp_path, size):
    tf = _tf()
    ours = Qwen2VLConfig.from_pretrained(REAL[size])
    ours.save_pretrained(tmp_path)
    theirs = tf.Qwen2VLConfig.from_pretrained(tmp_path)
    assert_same_as_oracle(ours, theirs)
    assert Qwen2VLConfig.from_pretrained(tmp_path) == ours


@pytest.mark.parametrize("size", ["2B", "7B"])
def test_transformers_saved_loads_in_ours(tmp_path, size):
    tf = _tf()
    theirs = tf.Qwen2VLConfig.from_pretrained(REAL[size])
    theirs.save_pretrained(tmp_path)
    ours = Qwen2VLConfig.from_pretrained(tmp_path)
    assert_same_as_oracle(ours, theirs)
    assert ours == Qwen2VLConfig.from_pretrained(REAL[size])


def test_tiny_nested_config_matches_oracle(tmp_path):
    tf = _tf()
    d = _tiny_dict(tie_word_embeddings=True, torch_dtype="float32", foo_bar=7)
    ours = Qwen2VLConfig.from_dict(d)
    theirs = tf.Qwen2VLConfig(**json.loads(json.dumps(d)))
    assert_same_as_oracle(ours, theirs)
    assert ours.foo_bar == 7 and Qwen2VLConfig.from_dict(ours.to_dict()).foo_bar == 7
    assert ours.text_config.mrope_section == [2, 3, 3] and ours.text_config.rope_theta == 1e4


def test_tie_word_embeddings_in_text_config():
    tf = _tf()
    d = _tiny_dict()
    d["text_config"]["tie_word_embeddings"] = True
    ours = Qwen2VLConfig.from_dict(d)
    assert ours.tie_word_embeddings is True
    assert tf.Qwen2VLConfig(**json.loads(json.dumps(d))).tie_word_embeddings is True


def test_flat_rope_scaling_and_legacy_names():
    raw = json.loads((REAL["7B"] / "config.json").read_text())
    raw["rope_scaling"] = {"type": "mrope", "mrope_section": [32, 16, 16]}
    c = Qwen2VLConfig.from_dict(raw)
    assert c.text_config.mrope_section == [32, 16, 16]
    assert c.text_config.rope_parameters["rope_type"] == "default"
    assert c.text_config.rope_scaling is c.text_config.rope_parameters
    assert c.text_config.sliding_window is None  # use_sliding_window False
    v = Qwen2VLVisionConfig(in_chans=1, spatial_patch_size=16, embed_dim=64, num_heads=4)
    assert v.in_channels == 1 and v.patch_size == 16 and v.num_attention_heads == 4 and v.num_hidden_layers == 32
    assert Qwen2VLTextConfig(num_key_value_heads=None).num_key_value_heads == 64


def test_values_from_file_not_class_defaults():
    c = Qwen2VLConfig.from_pretrained(REAL["2B"])
    assert Qwen2VLTextConfig().rms_norm_eps == 1e-5 and c.text_config.rms_norm_eps == 1e-6
    assert c.text_config.max_window_layers == 28


def test_attn_implementation_and_dtype():
    c = Qwen2VLConfig.from_dict(_tiny_dict(), attn_implementation="eager")
    assert c.attn_implementation == "eager" and c.dtype is None
    c.attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        c.attn_implementation = "bogus"
    import torch
    assert Qwen2VLConfig.from_dict(_tiny_dict(dtype=torch.float16)).dtype == "float16"


@pytest.mark.parametrize("text_over, match", [
    ({"rope_parameters": {"mrope_section": [16, 24, 24]}}, r"sum\(mrope_section\) = 64.*head_dim/2 = 8"),
    ({"hidden_size": 66}, "divisible by num_attention_heads"),
    ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ({"vocab_size": 0}, "vocab_size must be a positive"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive"),
    ({"head_dim": 32}, "head_dim=32"),
])
def test_text_validation_errors(text_over, match):
    d = _tiny_dict()
    d["text_config"].update(text_over)
    with pytest.raises(ValueError, match=match):
        Qwen2VLConfig.from_dict(d)


@pytest.mark.parametrize("vis_over, match", [
    ({"embed_dim": 30, "num_heads": 4}, "divisible by num_heads"),
    ({"embed_dim": 36, "num_heads": 2}, "divisible by 4"),
    ({"depth": 0}, "depth must be a positive"),
    ({"patch_size": -14}, "patch_size must be a positive"),
])
def test_vision_validation_errors(vis_over, match):
    d = _tiny_dict()
    d["vision_config"].update(vis_over)
    with pytest.raises(ValueError, match=match):
        Qwen2VLConfig.from_dict(d)


def test_missing_paths_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no config.json"):
        Qwen2VLConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an existing file"):
        Qwen2VLConfig.from_pretrained(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"Qwen/Not-A-Real-Repo.*HF_HUB_OFFLINE"):
        Qwen2VLConfig.from_pretrained("Qwen/Not-A-Real-Repo")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a Qwen2-VL config"):
        Qwen2VLConfig.from_pretrained(tmp_path)
