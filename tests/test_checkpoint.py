"""Tests for qwen2vl.checkpoint: key layouts, meta-device loading, sharded saving, transformers interop."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from qwen2vl.checkpoint import (WEIGHTS_INDEX_NAME, WEIGHTS_NAME, checkpoint_state_dict, checkpoint_to_model_key,
                                load_checkpoint_into, model_kind, model_to_checkpoint_key, parse_size,
                                resolve_model_dir, save_checkpoint)
from qwen2vl.configuration import Qwen2VLConfig
from qwen2vl.model.modeling import Qwen2VLForConditionalGeneration, Qwen2VLModel
from paths import QWEN2VL

SHARED = QWEN2VL
REAL = {n: SHARED / f"Qwen2-VL-{n}-Instruct" for n in ("2B", "7B")}


def tiny_config(tied=True):
    return Qwen2VLConfig.from_dict({
        "text_config": {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                        "bos_token_id": 0, "eos_token_id": 1,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "patch_size": 4},
        "tie_word_embeddings": tied, "architectures": ["Qwen2VLForConditionalGeneration"]})


def random_model(cls=Qwen2VLForConditionalGeneration, tied=True, seed=0):
    torch.manual_seed(seed)
    m = cls(tiny_config(tied))
    with torch.no_grad():   # make norms/biases non-trivial too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def meta_model(config, cls=Qwen2VLForConditionalGeneration):
    with torch.device("meta"):
        return cls(config)


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------- key mapping
@pytest.mark.parametrize("ckpt, causal, base", [
    ("model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight",
     "language_model.layers.0.mlp.up_proj.weight"),
    ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "language_model.embed_tokens.weight"),
    ("model.norm.weight", "model.language_model.norm.weight", "language_model.norm.weight"),
    ("visual.blocks.1.attn.qkv.bias", "model.visual.blocks.1.attn.qkv.bias", "visual.blocks.1.attn.qkv.bias"),
    ("model.visual.merger.mlp.0.weight", "model.visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight"),
    ("model.language_model.norm.weight", "model.language_model.norm.weight", "language_model.norm.weight"),
    ("language_model.layers.1.self_attn.o_proj.weight", "model.language_model.layers.1.self_attn.o_proj.weight",
     "language_model.layers.1.self_attn.o_proj.weight"),
    ("lm_head.weight", "lm_head.weight", "lm_head.weight"),
])
def test_key_mapping(ckpt, causal, base):
    assert checkpoint_to_model_key(ckpt, "causal_lm") == causal
    assert checkpoint_to_model_key(ckpt, "base") == base
    legacy = model_to_checkpoint_key(causal, "causal_lm")
    assert legacy == model_to_checkpoint_key(base, "base")
    assert checkpoint_to_model_key(legacy, "causal_lm") == causal and not legacy.startswith(
        ("model.language_model", "model.visual"))
    with pytest.raises(ValueError, match="model_kind"):
        checkpoint_to_model_key(ckpt, "vision")


def test_model_kind():
    assert model_kind(meta_model(tiny_config())) == "causal_lm"
    assert model_kind(meta_model(tiny_config(), Qwen2VLModel)) == "base"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30
    assert parse_size("100KB") == 100_000 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [True, False])
def test_single_file_roundtrip(tmp_path, tied):
    m = random_model(tied=tied)
    files = save_checkpoint(m, tmp_path)
    assert files == [tmp_path / WEIGHTS_NAME] and not (tmp_path / WEIGHTS_INDEX_NAME).exists()
    with safe_open(str(files[0]), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("visual.patch_embed.proj.weight").get_shape() == [32, 3, 2, 4, 4]
    assert ("lm_head.weight" in keys) is not tied
    assert "model.embed_tokens.weight" in keys and "visual.merger.mlp.2.bias" in keys
    assert not any(k.startswith(("model.language_model", "model.visual")) for k in keys)
    m2 = meta_model(m.config)
    assert load_checkpoint_into(m2, tmp_path) == ([], [])
    assert_same_state(m, m2)
    assert (m2.lm_head.weight is m2.model.language_model.embed_tokens.weight) is tied


def test_sharded_roundtrip_and_stale_files(tmp_path):
    m = random_model(tied=False)
    save_checkpoint(m, tmp_path)                                 # single file first ...
    files = save_checkpoint(m, tmp_path, max_shard_size="40KB")  # ... then sharded: the single file goes away
    assert len(files) > 2 and not (tmp_path / WEIGHTS_NAME).exists()
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    state = checkpoint_state_dict(m)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert sorted(set(index["weight_map"].values())) == sorted(f.name for f in files)
    for f in files:
        assert f.stat().st_size < 40_000 + 10_000 or len(safe_open(str(f), "pt").keys()) == 1
    m2 = meta_model(m.config)
    load_checkpoint_into(m2, tmp_path)
    assert_same_state(m, m2)
    save_checkpoint(m, tmp_path)   # back to one file: shards and index removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]


def test_new_layout_and_bare_base_layout_load(tmp_path):
    m = random_model(tied=False)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["model.visual.patch_embed.proj.weight"] = sd["model.visual.patch_embed.proj.weight"].reshape(32, 3, 2, 4, 4)
    save_file(sd, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})   # new (module) layout
    m2 = meta_model(m.config)
    load_checkpoint_into(m2, tmp_path)
    assert_same_state(m, m2)
    # a bare Qwen2VLModel loads the same files (lm_head ignored) and saves the legacy layout
    b = meta_model(m.config, Qwen2VLModel)
    assert load_checkpoint_into(b, tmp_path) == ([], [])
    assert_same_state(m.model, b)
    save_checkpoint(b, tmp_path / "base")
    with safe_open(str(tmp_path / "base" / WEIGHTS_NAME), "pt") as f:
        assert "model.layers.0.mlp.up_proj.weight" in f.keys() and "visual.blocks.0.norm1.weight" in f.keys()
    m3 = meta_model(m.config)
    assert load_checkpoint_into(m3, tmp_path / "base", strict=False).missing_keys == ["lm_head.weight"]


def test_dtype_conversion(tmp_path):
    m = random_model(tied=True)
    save_checkpoint(m.to(torch.bfloat16), tmp_path)
    m2 = meta_model(m.config)
    load_checkpoint_into(m2, tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in m2.parameters())
    assert torch.equal(m2.model.language_model.norm.weight, m.model.language_model.norm.weight.half())
    m3 = meta_model(m.config)
    load_checkpoint_into(m3, tmp_path, dtype="auto")
    assert_same_state(m, m3)
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint_into(meta_model(m.config), tmp_path, dtype="int17")


# ------------------------------------------------------------------------------------------------- no random init
def test_meta_load_does_not_initialize(tmp_path, monkeypatch):
    m = random_model(tied=True)
    save_checkpoint(m, tmp_path)

    m2 = meta_model(m.config)    # (building on meta may run reset_parameters on meta tensors: no memory)

    def boom(*a, **k):
        raise AssertionError("random init called during loading")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(nn.init, name, boom)
    monkeypatch.setattr(torch.Tensor, "normal_", boom)
    monkeypatch.setattr(torch.Tensor, "uniform_", boom)
    load_checkpoint_into(m2, tmp_path)
    monkeypatch.undo()
    ptrs = [p.data_ptr() for p in m2.parameters()]          # tied head is deduplicated by parameters()
    assert len(ptrs) == len(set(ptrs)) and not any(p.is_meta for p in m2.parameters())
    assert_same_state(m, m2)


def test_init_buffers_hook_and_meta_buffers(tmp_path):
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)

        def _init_buffers(self, device):
            self.inv_freq = torch.arange(4.0, device=device)

    class NoHook(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)

    class Tiny(nn.Module):
        def __init__(self, rot):
            super().__init__()
            self.lm_head = nn.Linear(2, 2, bias=False)
            self.rot = rot()

    save_checkpoint(Tiny(Rotary), tmp_path)
    with torch.device("meta"):
        t = Tiny(Rotary)
    load_checkpoint_into(t, tmp_path)
    assert torch.equal(t.rot.inv_freq, torch.arange(4.0))
    with torch.device("meta"):
        t = Tiny(NoHook)
    with pytest.raises(ValueError, match=r"still on the meta device.*rot\.inv_freq"):
        load_checkpoint_into(t, tmp_path)


# ------------------------------------------------------------------------------------------------- errors
def test_missing_unexpected_and_shape_errors_listed_together(tmp_path):
    m = random_model(tied=False)
    sd = checkpoint_state_dict(m)
    sd = {k: v.clone() for k, v in sd.items()}
    del sd["model.norm.weight"], sd["visual.blocks.1.mlp.fc1.bias"]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    sd["visual.mystery.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError) as ei:
        load_checkpoint_into(meta_model(m.config), tmp_path)
    msg = str(ei.value)
    for s in ("missing 2", "model.language_model.norm.weight", "model.visual.blocks.1.mlp.fc1.bias",
              "unexpected 1", "visual.mystery.weight", "wrong shape", "expected (64, 64), got (3, 64)"):
        assert s in msg, s
    del sd["model.layers.0.self_attn.q_proj.weight"]
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing 3"):
        load_checkpoint_into(meta_model(m.config), tmp_path)


def test_missing_files_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_checkpoint_into(meta_model(tiny_config()), tmp_path)
    (tmp_path / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="do not exist"):
        load_checkpoint_into(meta_model(tiny_config()), tmp_path)
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"Qwen/Not-A-Real-Repo.*HF_HUB_OFFLINE"):
        resolve_model_dir("Qwen/Not-A-Real-Repo")
    with pytest.raises(ValueError, match="safetensors"):
        save_checkpoint(random_model(), tmp_path, safe_serialization=False)


# ------------------------------------------------------------------------------------------------- transformers
def _tf_model(tied):
    tf = pytest.importorskip("transformers")
    cfg = tf.Qwen2VLConfig(**tiny_config(tied).to_dict())
    torch.manual_seed(1)
    return tf.Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_saved_loads_in_ours(tmp_path, tied):
    theirs = _tf_model(tied)
    theirs.save_pretrained(tmp_path, max_shard_size="60KB" if tied else "5GB")
    config = Qwen2VLConfig.from_pretrained(tmp_path)
    ours = meta_model(config)
    load_checkpoint_into(ours, tmp_path)
    ts, os_ = theirs.state_dict(), ours.state_dict()
    assert set(os_) == {k for k in ts if "inv_freq" not in k}
    for k, v in os_.items():
        assert torch.equal(v, ts[k].reshape(v.shape)), k


@pytest.mark.parametrize("tied", [True, False])
def test_ours_saved_loads_in_transformers(tmp_path, tied):
    tf = pytest.importorskip("transformers")
    ours = random_model(tied=tied)
    ours.config.save_pretrained(tmp_path)
    save_checkpoint(ours, tmp_path, max_shard_size="50KB")
    theirs = tf.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    ts, os_ = theirs.state_dict(), ours.state_dict()
    for k, v in os_.items():
        assert torch.equal(v, ts[k].reshape(v.shape)), k
    assert (theirs.lm_head.weight.data_ptr() == theirs.model.language_model.embed_tokens.weight.data_ptr()) is tied


# ------------------------------------------------------------------------------------------------- real sizes
def expected_hub_shapes(c: Qwen2VLConfig) -> dict[str, tuple]:
    """Hub-layout tensor shapes derived from the config (REFERENCE §2.9, §3.1)."""
    t, v = c.text_config, c.vision_config
    e, H, D = v.embed_dim, t.hidden_size, t.head_dim
    mlp, mh = int(e * v.mlp_ratio), e * v.spatial_merge_size ** 2
    out = {"visual.patch_embed.proj.weight": (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
           "visual.merger.ln_q.weight": (e,), "visual.merger.ln_q.bias": (e,),
           "visual.merger.mlp.0.weight": (mh, mh), "visual.merger.mlp.0.bias": (mh,),
           "visual.merger.mlp.2.weight": (v.hidden_size, mh), "visual.merger.mlp.2.bias": (v.hidden_size,),
           "model.embed_tokens.weight": (t.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        for n, s in {"norm1": (e,), "norm2": (e,)}.items():
            out[p + n + ".weight"] = out[p + n + ".bias"] = s
        for n, (o, i_) in {"attn.qkv": (3 * e, e), "attn.proj": (e, e), "mlp.fc1": (mlp, e),
                           "mlp.fc2": (e, mlp)}.items():
            out[p + n + ".weight"], out[p + n + ".bias"] = (o, i_), (o,)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        q, kv = t.num_attention_heads * D, t.num_key_value_heads * D
        for n, (o, i_) in {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H)}.items():
            out[p + f"self_attn.{n}.weight"], out[p + f"self_attn.{n}.bias"] = (o, i_), (o,)
        out[p + "self_attn.o_proj.weight"] = (H, q)
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (t.intermediate_size, H)
        out[p + "mlp.down_proj.weight"] = (H, t.intermediate_size)
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (H,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, H)
    return out


@pytest.mark.parametrize("size", ["2B", "7B"])
def test_real_size_meta_model_matches_hub_index(size):
    config = Qwen2VLConfig.from_pretrained(REAL[size])
    index = json.loads((REAL[size] / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
    model = meta_model(config)
    kind = model_kind(model)
    names = {model_to_checkpoint_key(n, kind): tuple(p.shape) for n, p in model.named_parameters()}
    assert set(names) == set(index)          # exact names, lm_head absent when tied (2B)
    expected = expected_hub_shapes(config)
    assert set(expected) == set(index)
    for k, shape in names.items():
        if k == "visual.patch_embed.proj.weight":   # 2-D Linear in the model, 5-D Conv3d on disk
            assert shape == (expected[k][0], int(torch.tensor(expected[k][1:]).prod()))
        else:
            assert shape == expected[k], k
    t = config.text_config
    table = {"2B": (1536, 8960, 151936, 256), "7B": (3584, 18944, 152064, 512)}[size]
    assert expected["model.layers.0.self_attn.k_proj.weight"][0] == table[3]
    assert expected["model.embed_tokens.weight"] == (table[2], table[0])
    assert expected["model.layers.0.mlp.up_proj.weight"] == (table[1], table[0])
    assert expected["visual.merger.mlp.2.weight"] == (table[0], 5120) and t.head_dim == 128
    assert expected["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)


def test_non_strict_initializes_only_missing(tmp_path):
    m = random_model(tied=False)
    sd = {k: v.clone() for k, v in checkpoint_state_dict(m).items()}
    del sd["model.layers.0.self_attn.q_proj.bias"]
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    m2 = meta_model(m.config)
    res = load_checkpoint_into(m2, tmp_path, strict=False)
    assert res.missing_keys == ["model.language_model.layers.0.self_attn.q_proj.bias"]
    q, q2 = m.model.language_model.layers[0].self_attn.q_proj, m2.model.language_model.layers[0].self_attn.q_proj
    assert torch.equal(q.weight, q2.weight) and torch.equal(q2.bias, torch.zeros_like(q2.bias))


# ------------------------------------------------------------------------------------------------ own memory
def _mapping_of(ptr: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= ptr < hi:
            return line
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_load_copies_weights_out_of_the_mapped_file(tmp_path):
    """safetensors hands out views of the memory-mapped file; the loader keeps copies in the process's own memory
    (decoding reads them faster there, see qwen2vl/own_memory.py) with the same values, also when copied in
    several chunks."""
    from qwen2vl.own_memory import to_own_memory

    m = random_model(tied=False)
    save_checkpoint(m, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        src = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert WEIGHTS_NAME in _mapping_of(src.data_ptr())  # the premise: a view of the file
        expect = src.clone()
        own = to_own_memory(src)
    assert torch.equal(own, expect) and WEIGHTS_NAME not in _mapping_of(own.data_ptr())
    m2 = meta_model(m.config)
    load_checkpoint_into(m2, tmp_path)
    assert_same_state(m, m2)
    assert not any(WEIGHTS_NAME in _mapping_of(p.data_ptr()) for p in m2.parameters())
    big = torch.randn(3 * 2 ** 20 // 4 + 5, dtype=torch.float32)  # several chunks, odd tail
    save_file({"w": big}, str(tmp_path / "big.safetensors"))
    with safe_open(str(tmp_path / "big.safetensors"), "pt") as f:
        from qwen2vl import own_memory
        chunk, own_memory.CHUNK_BYTES = own_memory.CHUNK_BYTES, 2 ** 20
        try:
            assert torch.equal(to_own_memory(f.get_tensor("w")), big)
        finally:
            own_memory.CHUNK_BYTES = chunk
