"""The op layer (qwen2vl/kernels/ops.py, backend.py): the C header, the ctypes table and the torch.library schemas
agree; a call with wrong arguments raises instead of reaching C; each forced backend gives the torch reference's
result through a whole model; the no-compiler choice is logged once."""
import logging
import re

import pytest
import torch

from qwen2vl.kernels import backend, build, cpu_ops, ops
from tiny import tiny_model

_CTYPE = {"int": "int", "int64_t": "int64", "float": "float"}


def sharp_model():
    """A bf16 tiny model whose weights are large enough that attention is far from uniform (at the init scale
    q.k is ~0 and a rotary or cache bug would not show in the logits)."""
    m = tiny_model(seed=0, intermediate=64, mrope_section=(4, 2, 2))  # fused kernels: I % 32, head_dim % 16
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.to(torch.bfloat16).eval()


def header_functions() -> dict[str, list[str]]:
    """name -> argument kinds ("ptr", "int64", "int", "float") of every QWEN2VL_API prototype in the header."""
    text = re.sub(r"/\*.*?\*/", "", build.HEADER.read_text(), flags=re.S)
    out = {}
    for ret, name, args in re.findall(r"QWEN2VL_API\s+(\w+)\s+(\w+)\s*\(([^)]*)\)\s*;", text):
        assert ret == "int", name
        kinds = []
        for arg in (a.strip() for a in args.split(",")):
            base = re.sub(r"\bconst\b", "", arg.rsplit(None, 1)[0] if "*" not in arg else arg).strip()
            kinds.append("ptr" if "*" in arg else _CTYPE[base.split()[0]])
        out[name] = kinds
    return out


def ctypes_kind(t) -> str:
    import ctypes

    return {ctypes.c_void_p: "ptr", ctypes.c_int64: "int64", ctypes.c_int: "int", ctypes.c_float: "float"}[t]


def test_header_matches_the_python_table():
    """Every exported C function has the same argument count and kinds in qwen2vl_kernels.h and C_FUNCTIONS
    (the C compiler checks the definitions against the header: every .c includes it)."""
    header = header_functions()
    assert set(header) == set(build.C_FUNCTIONS)
    for name, kinds in header.items():
        assert [ctypes_kind(t) for t in build.C_FUNCTIONS[name]] == kinds, name
    # the sources include the header, so a definition that drifts from it does not compile
    assert '#include "qwen2vl_kernels.h"' in (build.HEADER.parent / "cpu_common.h").read_text()


def test_every_op_has_a_schema_and_a_fake():
    for name in ops._SCHEMAS:
        op = getattr(torch.ops.qwen2vl, name).default
        assert op._schema.name == f"qwen2vl::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or \
            torch._library.simple_registry.singleton.find(op.name()).fake_impl.kernel is not None, name


def test_argument_mismatches_raise_before_c():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    with pytest.raises(RuntimeError, match="missing value for argument 'bias'"):   # schema: count
        torch.ops.qwen2vl.gemv(x, w, None)
    with pytest.raises(RuntimeError, match="Expected a value of type"):             # schema: type
        torch.ops.qwen2vl.rms_norm(x, w[0], "eps")
    with pytest.raises(ValueError, match="weight must be"):                          # shapes the C code assumes
        torch.ops.qwen2vl.gemv(x, w.float(), None, None, True)
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.qwen2vl.gemv(x, w[:, :32].contiguous(), None, None, True)
    with pytest.raises(ValueError, match="weights per layer"):
        torch.ops.qwen2vl.decode_layers_(x, [w], [w], [w], [0, 0], 1, None, x, x, 2, 1e-6, 1.0, [], [], 0, 0)
    if build.library() is not None:
        with pytest.raises(TypeError, match="takes 4 arguments, got 5"):              # ctypes passes extras on
            ops.call("silu_mul", None, None, 0, 1, 5)


def test_the_ops_trace_under_fake_tensors():
    """torch.compile sees the ops through their fake implementations (shapes, no C call)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(96, 64, dtype=torch.bfloat16)
        assert torch.ops.qwen2vl.linear(x, w, None).shape == (3, 96)
        assert torch.ops.qwen2vl.gemv(x, w, None, None, False).dtype == torch.float32
        q = torch.empty(2, 4, 80, 16, dtype=torch.bfloat16)
        assert torch.ops.qwen2vl.prefill_attention(q, q[:, :2], q[:, :2], 0.25).shape == q.shape
        assert torch.ops.qwen2vl.rope(torch.empty(2, 1, 64), torch.empty(2, 1, 16), torch.empty(2, 1, 16),
                                      16).shape == (2, 1, 64)


@pytest.mark.parametrize("ops_layer", [backend.TorchOps(), backend.KernelOps("test")], ids=["torch", "kernels"])
def test_each_op_layer_matches_the_reference(ops_layer):
    """Both op layers give the fp32 reference's result within bf16 rounding (the kernels where they apply)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 64).bfloat16(), torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert (ops_layer.linear(x, w, b).float() - ref).abs().max() <= 2 ** -6 * ref.abs().max()
    n = torch.randn(64).bfloat16()
    r = backend.TorchOps().rms_norm(x, n, 1e-6)
    assert torch.equal(ops_layer.rms_norm(x, n, 1e-6), r)                              # bit-identical
    cos, sin = torch.randn(2, 3, 16).bfloat16(), torch.randn(2, 3, 16).bfloat16()
    q, k = torch.randn(2, 3, 64).bfloat16(), torch.randn(2, 3, 32).bfloat16()
    for got, want in zip(ops_layer.rope(q, k, cos, sin, 16), backend.TorchOps().rope(q, k, cos, sin, 16)):
        assert torch.equal(got, want)
    g, u = torch.randn(5, 64).bfloat16(), torch.randn(5, 64).bfloat16()
    assert torch.equal(ops_layer.silu_mul(g.clone(), u), backend.TorchOps().silu_mul(g.clone(), u))


@pytest.mark.parametrize("spec", ["torch", "kernels"])
def test_forced_backend_through_a_model_matches_torch_ops(monkeypatch, spec):
    """QWEN2VL_BACKEND=torch / kernels on a whole bf16 model: the same next-token logits as the model built on
    TorchOps (the pure PyTorch reference), within bf16 rounding."""
    from qwen2vl.kernels import choose

    monkeypatch.setenv(choose.ENV, spec)
    choose.reset()
    m = sharp_model()
    ids = torch.arange(7, 25).view(2, 9)
    with torch.no_grad():
        got = m(input_ids=ids).logits.float()
        for mod in m.modules():
            if hasattr(mod, "ops"):
                mod.ops = backend.TorchOps()
        ref = m(input_ids=ids).logits.float()
    choose.reset()
    assert (got - ref).abs().max() <= 2 ** -5 * ref.abs().max()


def test_no_compiler_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.setattr(build, "flavour", lambda: "avx2")
    monkeypatch.setattr(backend, "_current", None)
    with caplog.at_level(logging.INFO, logger="qwen2vl.kernels.backend"):
        first, again = backend.current(), backend.current()
    assert type(first) is backend.TorchOps and again is first
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen2vl.kernels.backend"]
    assert lines == [f"qwen2vl: no C compiler: using PyTorch ops (expect {backend.TORCH_DECODE_SLOWDOWN} slower "
                     "CPU decoding)"]


def test_decode_layers_refuses_what_it_cannot_run():
    """The fused step's entry point says False (nothing written) where a kernel precondition fails."""
    x = torch.randn(1, 48).bfloat16()  # H % 32 != 0
    assert cpu_ops.decode_layers(x, [x] * 12, [torch.zeros(1, 1, 4, 16).bfloat16()],
                                 [torch.zeros(1, 1, 4, 16).bfloat16()], [0], 1, None, x, x, 2, 1e-6, 1.0) is False


def test_decode_step_backends_agree(monkeypatch):
    """The model's one decoding step on its three backends, from the same prefilled cache: the fused CPU kernel
    call and the layer-by-layer ops give the same bits, the static-shape step (uncompiled) the same logits up to
    its SDPA-over-all-slots rounding."""
    from qwen2vl.model import static_decode, text
    from qwen2vl.model.cache import KVCache

    if not cpu_ops.has_bf16_gemv():
        pytest.skip("needs the CPU kernels' bf16 GEMV (AVX512-BF16 or the AVX2 build)")
    m = sharp_model()
    ids = torch.arange(7, 21).view(2, 7)
    runs, fused = {}, []
    real = cpu_ops.decode_layers
    monkeypatch.setattr(cpu_ops, "decode_layers", lambda *a: fused.append(real(*a)) or fused[-1])
    for backend_name in ("fused", "per_op", "static"):
        with torch.no_grad():
            cache = KVCache.from_config(m.config.text_config, 2, 12, torch.bfloat16, "cpu")
            logits = m(input_ids=ids, past_key_values=cache).logits[:, -1].float()
            static = None
            if backend_name == "static":
                static = static_decode.StaticDecoder(m, 2, 12, compile=False)
                static.adopt(cache)
            steps = []
            with monkeypatch.context() as mp:
                if backend_name == "per_op":
                    mp.setattr(text, "fused_decode_step", lambda *a: None)
                for _ in range(3):
                    tokens = logits.argmax(-1)[:, None]
                    logits = static.step(tokens) if static else m.decode_step(tokens, cache)[0]
                    steps.append(logits)
        runs[backend_name] = torch.stack(steps)
    assert fused == [True] * 3  # the fused backend ran (and only in its own run)
    assert torch.equal(runs["fused"], runs["per_op"])
    torch.testing.assert_close(runs["static"], runs["fused"], atol=0.05 * runs["fused"].abs().max().item(), rtol=0)
