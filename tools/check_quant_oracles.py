"""Cross-check `qwen2vl.checkpoint_quant`'s AWQ / GPTQ unpacking against the formats' own CPU dequantizers
(not part of CI: needs the sdist / wheel files, which are never installed, only read).

    pip download autoawq==0.2.9 --no-deps -d /tmp/o && tar xzf /tmp/o/autoawq-0.2.9.tar.gz -C /tmp/o
    pip download auto-gptq==0.7.1 --no-deps -d /tmp/o && unzip -o /tmp/o/auto_gptq-0.7.1-*.whl -d /tmp/o/agptq
    PYTHONPATH=. python tools/check_quant_oracles.py \
        /tmp/o/autoawq-0.2.9/awq/utils/packing_utils.py /tmp/o/agptq/auto_gptq/nn_modules/qlinear/qlinear_cuda.py

AutoAWQ's `dequantize_gemm` (its WQLinear_GEMM CPU path) and AutoGPTQ's `QuantLinear` CPU forward (act-order
g_idx included) read checkpoints packed by tests/quant_checkpoints.py; both must match what our unpacker gives.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quant_checkpoints import (dequantize, pack_awq_columns, pack_gptq_columns, pack_gptq_rows,  # noqa: E402
                               quantize_codes)

from qwen2vl.checkpoint_quant import unpack_awq, unpack_gptq  # noqa: E402


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours(q, s, z, g_idx):
    """Dequantized (out, in) weight from our unpacker's outputs."""
    g = torch.as_tensor(g_idx).long()
    return (q.double() - z.double()[:, g]) * s.double()[:, g]


def main(awq_utils: str, gptq_linear: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out, n_in, group = 96, 256, 64
    w = torch.randn(out, n_in) * 0.05

    g_idx = np.arange(n_in) // group
    q, z, s = quantize_codes(w, g_idx, sym=False)
    qw, qz = pack_awq_columns(q.T), pack_awq_columns(z.T)
    awq = _load(awq_utils, "awq_packing_utils")
    theirs = awq.dequantize_gemm(qw, qz, s.t().contiguous(), 4, group).double().t()    # fp16 math
    mine = ours(*unpack_awq(qw, qz, s.t().contiguous()), g_idx)
    print(f"AWQ gemm: max |AutoAWQ - ours| = {(theirs - mine).abs().max():.2e} "
          f"(ours rounded to fp16: {(theirs - mine.half().double()).abs().max():.2e}), "
          f"|ours - codes| = {(mine - dequantize(q, z, s, g_idx)).abs().max():.2e}")

    gptq = _load(gptq_linear, "autogptq_qlinear_cuda")
    g_idx = (np.arange(n_in) // group)[np.argsort(rng.permutation(n_in))]   # act-order
    q, z, s = quantize_codes(w, g_idx, sym=True)
    lin = gptq.QuantLinear(4, group, n_in, out, bias=False)
    lin.qweight, lin.qzeros = pack_gptq_rows(q.T), pack_gptq_columns(z.T - 1)   # v1: zero points minus one
    lin.scales, lin.g_idx = s.t().contiguous(), torch.from_numpy(g_idx.astype(np.int32))
    lin.autogptq_cuda_available = False
    x = torch.eye(n_in, dtype=torch.float16)          # x @ W.T with x = I reads the dequantized weight back
    theirs = lin(x).double().t()
    mine = ours(*unpack_gptq(lin.qweight, lin.qzeros, lin.scales, 1), g_idx)
    print(f"GPTQ v1 act-order: max |AutoGPTQ - ours| = {(theirs - mine).abs().max():.2e} "
          f"(ours rounded to fp16: {(theirs - mine.half().double()).abs().max():.2e})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
