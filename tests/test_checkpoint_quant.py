"""Loading AWQ (AutoAWQ GEMM) and GPTQ checkpoints, as in the hub's Qwen2-VL-*-Instruct-AWQ / -GPTQ-Int4 repos.

The checkpoints are written by tests/quant_checkpoints.py from the formats' published packing (independent of
the loader); each loaded layer must equal x @ W.T + b with W rebuilt from the integer codes the writer chose, and
the whole model must give the logits of a float model holding those dequantized weights.
"""
from __future__ import annotations

import json

import pytest
import torch

from qwen2vl.checkpoint_quant import parse_quantization_config
from qwen2vl.model import Qwen2VLForConditionalGeneration
from qwen2vl.quantization import Int4WeightOnlyLinear

from quant_checkpoints import LINEARS, dequantize, set_quantization_config, write_quantized
from tiny import tiny_model


def _model(seed=0, tie=True, vocab=99):
    # hidden 128, intermediate 256: in_features of 128 / 256 hold whole groups of 128 (as the hub repos)
    return tiny_model(seed=seed, mrope_section=(8, 4, 4), intermediate=256, tie=tie, vocab=vocab)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_layers(loaded, codes, float_model):
    """Each quantized layer of `loaded` against x @ W.T + b, W rebuilt from the writer's integer codes."""
    torch.manual_seed(1)
    for prefix, (q, z, s, g_idx) in codes.items():
        _, _, i, name = prefix.split(".", 3)
        layer = loaded.model.language_model.layers[int(i)].get_submodule(name)
        assert isinstance(layer, Int4WeightOnlyLinear), prefix
        bias = float_model.model.language_model.layers[int(i)].get_submodule(name).bias
        w = dequantize(q, z, s, g_idx)
        x = torch.randn(3, w.shape[1])
        ref = x.double() @ w.T + (0 if bias is None else bias.double())
        assert _rel(layer(x), ref) <= 1e-3, prefix
        assert torch.allclose(layer.dequantized_weight(torch.float32).double(), w, rtol=0, atol=1e-6), prefix


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method,kw", [
    ("awq", dict(group=128)),                                   # the hub's AWQ repos
    ("awq", dict(group=32)),                                    # several groups per row
    ("gptq", dict(group=128)),                                  # the hub's GPTQ-Int4 repos (v1, sym, no act-order)
    ("gptq", dict(group=32, desc_act=True)),                    # act-order: a shuffled g_idx
    ("gptq", dict(group=64, fmt="gptq_v2", sym=False, desc_act=True)),   # v2 asymmetric zero points
])
def test_loaded_layers_and_logits_match_the_dequantized_float_model(tmp_path, method, kw):
    model = _model()
    codes = write_quantized(model, tmp_path, method, **kw)
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.quantization == "int4" and loaded.quantization_config["method"] == method
    _check_layers(loaded, codes, model)
    if method == "awq":   # AWQ zero points really vary (not all 8)
        assert len({int(v) for (_, z, _, _) in codes.values() for v in z.flat}) > 4
    ids = torch.randint(7, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    assert _rel(_logits(loaded, ids), _logits(model, ids)) <= 1e-3
    # the vision tower and the embedding are untouched floating-point layers
    assert type(loaded.model.visual.blocks[0].attn.qkv) is type(model.model.visual.blocks[0].attn.qkv)
    assert torch.equal(loaded.model.visual.blocks[0].attn.qkv.weight, model.model.visual.blocks[0].attn.qkv.weight)


def test_bf16_load_and_generate(tmp_path):
    """The repos' usual dtype path: fp16 scales kept exactly, bf16 activations; greedy tokens as the float model."""
    model = _model()
    write_quantized(model, tmp_path, "awq", group=128)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float16"   # as the hub's repos: "auto" on a CPU then means bfloat16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    assert Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype="float16").dtype == torch.float16
    q_proj = loaded.model.language_model.layers[0].self_attn.q_proj
    assert q_proj.scales.dtype == torch.float32 and q_proj.bias.dtype == torch.bfloat16
    ids = torch.randint(7, 90, (1, 7), generator=torch.Generator().manual_seed(3))
    assert _rel(_logits(loaded, ids).float(), _logits(model, ids)) <= 3e-2
    out = loaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 11)


def test_partly_quantized_untied_head_and_lm_head_quantized(tmp_path):
    """Only the layers with a qweight become 4-bit (down_proj left in float here); a quantized untied LM head loads."""
    model = _model(tie=False, vocab=104)
    write_quantized(model, tmp_path, "gptq", group=128, layers=LINEARS[:-1], head=True)
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    layer = loaded.model.language_model.layers[1]
    assert isinstance(layer.mlp.gate_proj, Int4WeightOnlyLinear) and isinstance(loaded.lm_head, Int4WeightOnlyLinear)
    assert type(layer.mlp.down_proj) is type(model.model.language_model.layers[1].mlp.down_proj)
    ids = torch.randint(7, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    assert _rel(_logits(loaded, ids), _logits(model, ids)) <= 1e-3
    with pytest.raises(ValueError, match="not supported"):   # our int4 format needs every projection in int4
        loaded.save_pretrained(tmp_path / "again")


def test_loaded_hub_checkpoint_saves_in_our_int4_format(tmp_path):
    model = _model()
    write_quantized(model, tmp_path / "awq", "awq", group=128)
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "awq", dtype=torch.float32)
    loaded.save_pretrained(tmp_path / "own")
    qc = json.loads((tmp_path / "own" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qwen2vl_int4" and qc["method"] == "awq" and qc["group_size"] == 128
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "own", dtype=torch.float32)
    ids = torch.randint(7, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(again, ids), _logits(loaded, ids))


UNSUPPORTED = [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "marlin"}, "version 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "version 'exllama'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "backend": "llm-awq"}, "llm-awq"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": False}, "zero_point"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "bits=8"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True}, "bits=8"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128, "sym": True}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False}, "asymmetric"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int16"}, "pack_dtype"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "fp8", "bits": 8}, "quant_method 'fp8'"),
]


@pytest.mark.parametrize("qc,needle", UNSUPPORTED)
def test_unsupported_variants_name_the_field(qc, needle):
    with pytest.raises(ValueError, match="unsupported quantization_config") as e:
        parse_quantization_config(qc)
    assert needle in str(e.value) and "Loadable 4-bit checkpoints: awq" in str(e.value)


def test_unsupported_and_broken_checkpoints_fail_clearly(tmp_path):
    model = _model()
    write_quantized(model, tmp_path, "gptq", group=128)
    set_quantization_config(tmp_path, {"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True})
    with pytest.raises(ValueError, match=r"bits=8; only 4-bit"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    # config says AWQ but the tensors are GPTQ-shaped: a shape error naming the tensor, no crash in torch
    set_quantization_config(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.qweight: expected \(256, 16\)"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    # already quantized: no second quantization / adapter / tensor parallelism on top
    set_quantization_config(tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})
    with pytest.raises(ValueError, match="holds a quantized checkpoint .*need a full-precision one"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, quantization="int8")
    # a quantization_config but no quantized tensor
    plain = tmp_path / "plain"
    _model().save_pretrained(plain)
    set_quantization_config(plain, {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"})
    with pytest.raises(ValueError, match=r"no '\*\.qweight' key"):
        Qwen2VLForConditionalGeneration.from_pretrained(plain)


def test_quantized_non_linear_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model()
    write_quantized(model, tmp_path, "awq", group=128)
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    state["model.norm.qweight"] = torch.zeros(128, 16, dtype=torch.int32)
    save_file(state, str(f))
    with pytest.raises(ValueError, match="stores 'model.norm' quantized .* not a linear layer"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"


def test_cli_run_and_engine_on_a_gptq_folder(tmp_path, capsys):
    """`qwen2vl run` on a GPTQ act-order copy of the bundled demo model (intermediate 688: a last, short group of
    128) answers as the float model holding the same dequantized weights; the serving engine (LLM) loads it and
    decodes the float model's tokens."""
    import shutil
    from types import SimpleNamespace

    from qwen2vl.cli import _content, _generate, main
    from qwen2vl.engine import LLM, SamplingParams
    from qwen2vl.loading import demo_model_path
    from qwen2vl.processing import AutoProcessor

    from test_cli import EXAMPLE1

    quant = tmp_path / "gptq"
    shutil.copytree(demo_model_path(), quant)
    model = Qwen2VLForConditionalGeneration.from_pretrained("qwen2vl-demo", dtype=torch.float32)
    write_quantized(model, quant, "gptq", group=128, desc_act=True)
    question = "How many shapes are there?"
    assert main(["run", "--model", str(quant), "--image", str(EXAMPLE1), "--json", question]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    processor = AutoProcessor.from_pretrained(quant)
    messages = [{"role": "user", "content": _content([str(EXAMPLE1)], text=question)}]
    expected = _generate(model, processor, messages, SimpleNamespace(max_new_tokens=256, temperature=None))
    assert answer == expected["answer"] != ""
    llm = LLM(str(quant), max_num_seqs=2, max_model_len=128)
    assert isinstance(llm.model.model.language_model.layers[0].mlp.down_proj, Int4WeightOnlyLinear)
    prompts = [[520, 40, 41, 42], [520, 50, 51]]
    params = SamplingParams(max_tokens=6, temperature=0)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, o in zip(prompts, got):   # greedy until EOS (included) or 6 tokens, as the float model
        ref = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert list(o.outputs[0].token_ids) == ref[0, len(prompt):].tolist()
