"""Writers for AWQ (AutoAWQ GEMM) and GPTQ checkpoints, from the formats' published packing, for the loader tests.

Written independently of `qwen2vl.checkpoint_quant`: the packers OR each 4-bit value into its word one element
at a time in Python integers (the unpacker shifts and masks whole tensors along the other axis), and the
reference weight is rebuilt from the integer codes the writer chose, never from the packed tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_SPEC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   # AutoAWQ WQLinear_GEMM.from_linear: nibble i ← column 8c + order[i]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _to_int32(words: np.ndarray) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 → the int32 tensor a checkpoint stores (two's complement)."""
    assert words.min() >= 0 and words.max() < 2 ** 32
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_awq_columns(values: np.ndarray) -> torch.Tensor:
    """(rows, cols) ints 0..15 → (rows, cols/8) int32, AutoAWQ's interleaved nibble order."""
    rows, cols = values.shape
    words = np.zeros((rows, cols // 8), dtype=np.int64)
    for c in range(cols // 8):
        for i, col in enumerate(AWQ_SPEC_ORDER):
            words[:, c] |= values[:, 8 * c + col].astype(np.int64) << (4 * i)
    return _to_int32(words)


def pack_gptq_rows(values: np.ndarray) -> torch.Tensor:
    """(in, out) ints 0..15 → (in/8, out) int32: value of input 8r + j in nibble j of row r."""
    n_in, out = values.shape
    words = np.zeros((n_in // 8, out), dtype=np.int64)
    for r in range(n_in // 8):
        for j in range(8):
            words[r] += values[8 * r + j].astype(np.int64) * (16 ** j)
    return _to_int32(words)


def pack_gptq_columns(values: np.ndarray) -> torch.Tensor:
    """(rows, cols) ints 0..15 → (rows, cols/8) int32: column 8c + j in nibble j of word c."""
    rows, cols = values.shape
    words = np.zeros((rows, cols // 8), dtype=np.int64)
    for c in range(cols // 8):
        for j in range(8):
            words[:, c] += values[:, 8 * c + j].astype(np.int64) * (16 ** j)
    return _to_int32(words)


def quantize_codes(w: torch.Tensor, g_idx: np.ndarray, sym: bool):
    """Round-to-nearest codes for w (out, in), g_idx[i] = group of input i: q (out, in), z (out, n_groups) ints,
    s fp16 (out, n_groups); each group's range mapped onto 0..15 (asymmetric) or ±max|w| around 8 (symmetric)."""
    wd = w.double().numpy()
    order = np.argsort(g_idx, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(g_idx))[:-1]]
    by_group = wd[:, order]
    if sym:
        scale = np.maximum.reduceat(np.abs(by_group), starts, axis=1) / 7.5
        zero = np.full(scale.shape, 8)
    else:
        lo = np.minimum(np.minimum.reduceat(by_group, starts, axis=1), 0)
        hi = np.maximum(np.maximum.reduceat(by_group, starts, axis=1), 0)
        scale = (hi - lo) / 15
    s = torch.from_numpy(np.maximum(scale, 1e-4)).half()
    sd = s.double().numpy()
    if not sym:
        zero = np.clip(np.round(-lo / sd), 0, 15).astype(np.int64)
    q = np.clip(np.round(wd / sd[:, g_idx]) + zero[:, g_idx], 0, 15).astype(np.int64)
    return q, zero.astype(np.int64), s


def dequantize(q: np.ndarray, z: np.ndarray, s: torch.Tensor, g_idx: np.ndarray) -> torch.Tensor:
    """W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)] in float64 (the published formats' definition)."""
    zz, ss = z[:, g_idx], s.double().numpy()[:, g_idx]
    return torch.from_numpy((q - zz) * ss)


def write_quantized(model, out_dir: Path, method: str, group: int = 128, desc_act: bool = False,
                    fmt: str = "gptq", sym: bool = True, layers=LINEARS, head: bool = False, seed: int = 0) -> dict:
    """Quantize `model`'s decoder linears named in `layers` and save the model in AWQ or GPTQ format.

    The float model's weights are replaced by their dequantized values (so it is the exact float counterpart).
    `head`: the (untied) LM head too. Returns {hub key prefix: (q, z, s, g_idx)} for reference checks.
    """
    rng = np.random.default_rng(seed)
    model.save_pretrained(out_dir)
    state = load_file(str(out_dir / "model.safetensors"))
    codes = {}
    targets = [(f"model.layers.{i}.{name}", layer.get_submodule(name))
               for i, layer in enumerate(model.model.language_model.layers) for name in layers]
    if head:   # GPTQModel's lm_head=True (needs an untied head)
        targets.append(("lm_head", model.lm_head))
    for prefix, lin in targets:
        out, n_in = lin.weight.shape
        gs = n_in if group == -1 else group
        g_idx = np.arange(n_in) // gs
        if desc_act:   # act-order: groups follow a permutation of the inputs
            g_idx = g_idx[np.argsort(rng.permutation(n_in))]
        q, z, s = quantize_codes(lin.weight.data, g_idx, sym=(sym and method == "gptq"))
        w = dequantize(q, z, s, g_idx)
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        del state[prefix + ".weight"]
        if method == "awq":
            state[prefix + ".qweight"] = pack_awq_columns(q.T)
            state[prefix + ".qzeros"] = pack_awq_columns(z.T)
        else:
            state[prefix + ".qweight"] = pack_gptq_rows(q.T)
            state[prefix + ".qzeros"] = pack_gptq_columns(z.T - (1 if fmt == "gptq" else 0))
            state[prefix + ".g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        state[prefix + ".scales"] = s.t().contiguous()
        codes[prefix] = (q, z, s, g_idx)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True,
              "modules_to_not_convert": None}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act, "sym": sym,
              "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
        if fmt != "gptq":
            qc["checkpoint_format"] = fmt
    set_quantization_config(out_dir, qc)
    return codes


def set_quantization_config(model_dir: Path, qc: dict | None) -> None:
    cfg_path = Path(model_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if qc is None:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = qc
    cfg_path.write_text(json.dumps(cfg, indent=2))
