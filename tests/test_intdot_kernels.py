"""The integer-dot-product GEMV (cpu_intdot.c): int8 / 4-bit weights times activations quantized to int8 per block
(32 / 128 columns), both variants (AVX512-VNNI where this CPU has it, AVX2), against an emulation of the documented
arithmetic (tight: bf16 output rounding) and against the exact product (within the bound activation rounding
allows), and how QWEN2VL_BACKEND routes the int8 / int4 layers to it or to the exact kernels."""
import pytest
import torch
import torch.nn.functional as F

from qwen2vl.kernels import choose, cpu, cpu_int4
from qwen2vl.quantization import Int4WeightOnlyLinear
from qwen2vl.quantization.int8 import Int8WeightOnlyLinear
from qwen2vl.quantization.int4 import pack_nibbles

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(cpu_int4.intdot_isa() is None, reason="needs the CPU kernels and AVX2")]
VARIANTS = [0] + ([1] if cpu_int4.intdot_isa() == 1 else [])  # 0: AVX2, 1: AVX512-VNNI


def quantized_acts(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernel sees it: per row block, d = max|x| / 127, round(x * (127 / max|x|)) * d, ties to even."""
    m, k = x.shape
    xb = x.float().view(m, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, 0.0)).clamp(-127, 127)
    return (q.double() * (amax / 127.0).double()).view(m, k)


def within_rounding_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, block: int) -> bool:
    """|y - x @ w.T| <= what rounding the activations can cost (each element off by <= max|x| / 254 of its block,
    times |w|) + the bf16 output rounding, elementwise: the kernel's accuracy bound against the exact product."""
    m, k = x.shape
    half_step = (x.double().abs().view(m, k // block, block).amax(-1, keepdim=True) / 254).expand(m, k // block, block)
    bound = half_step.reshape(m, k) @ w.double().abs().T
    exact = x.double() @ w.double().T
    return bool(((y.double() - exact).abs() <= bound + 2 ** -8 * exact.abs() + 1e-6).all())


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.double() - ref.double()).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def int4_weights(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    z = torch.randint(0, 16, (n, k // group), generator=g).to(torch.uint8)
    w = (q.double() - z.double().repeat_interleave(group, 1)) * s.double().repeat_interleave(group, 1)
    return pack_nibbles(q), s, z, w


@pytest.mark.parametrize("use512", VARIANTS)
def test_int4_intdot_is_the_documented_arithmetic(use512):
    for n, k, group in ((48, 256, 128), (37, 384, 128), (17, 512, 256)):  # odd N: the two-row steps' tail
        qw, s, z, w = int4_weights(n, k, group, seed=n)
        for rows in range(1, 9):
            x = torch.randn(rows, k).bfloat16()
            y = cpu_int4.linear_int4_intdot(x, qw, s, z, group, use512=use512)
            assert y is not None and y.dtype == torch.bfloat16 and y.shape == (rows, n)
            assert rel_err(y, quantized_acts(x, 128) @ w.T) <= 2 ** -8, (n, k, group, rows)
            assert within_rounding_bound(y, x, w, 128), (n, k, group, rows)


@pytest.mark.parametrize("use512", VARIANTS)
def test_int8_intdot_is_the_documented_arithmetic(use512):
    g = torch.Generator().manual_seed(1)
    for n, k in ((48, 256), (33, 640)):
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g) * 0.01
        wd = w.double() * s.double()[:, None]
        for rows in range(1, 9):
            x = torch.randn(rows, k).bfloat16()
            y = cpu_int4.linear_int8_intdot(x, w, s, use512=use512)
            assert y is not None and y.dtype == torch.bfloat16 and y.shape == (rows, n)
            assert rel_err(y, quantized_acts(x, 32) @ wd.T) <= 2 ** -8, (n, k, rows)
            assert within_rounding_bound(y, x, wd, 32), (n, k, rows)


@pytest.mark.parametrize("use512", VARIANTS)
def test_zero_rows_outliers_and_extreme_codes(use512):
    """A zero row gives zeros (no 0 / 0), an outlier column only coarsens its own block, and the extreme codes
    (int8 -128 / 127: the +128 and sign tricks, 4-bit 15 with zero point 0) stay exact in the integer sums."""
    k, n = 256, 16
    x = torch.randn(3, k).bfloat16()
    x[0] = 0
    x[2, 5] = 300.0
    w8 = torch.full((n, k), 127, dtype=torch.int8)
    w8[::2] = -128
    s8 = torch.full((n,), 0.01)
    y8 = cpu_int4.linear_int8_intdot(x, w8, s8, use512=use512)
    ref8 = quantized_acts(x, 32) @ (w8.double() * 0.01).T
    assert torch.equal(y8[0], torch.zeros(n, dtype=torch.bfloat16))
    assert rel_err(y8, ref8) <= 2 ** -8
    q = torch.full((n, k), 15, dtype=torch.uint8)
    s4, z4 = torch.full((n, 2), 0.01), torch.zeros(n, 2, dtype=torch.uint8)
    y4 = cpu_int4.linear_int4_intdot(x, pack_nibbles(q), s4, z4, 128, use512=use512)
    assert torch.equal(y4[0], torch.zeros(n, dtype=torch.bfloat16))
    assert rel_err(y4, quantized_acts(x, 128) @ torch.full((n, k), 0.15, dtype=torch.float64).T) <= 2 ** -8


def test_threads_do_not_change_results_and_bad_shapes_are_declined():
    qw, s, z, _ = int4_weights(301, 256, 128, seed=3)
    w8 = torch.randint(-127, 128, (301, 256), dtype=torch.int8)
    x = torch.randn(4, 256).bfloat16()
    one = cpu_int4.linear_int4_intdot(x, qw, s, z, 128), cpu_int4.linear_int8_intdot(x, w8, s[:, 0])
    torch.set_num_threads(2)
    two = cpu_int4.linear_int4_intdot(x, qw, s, z, 128), cpu_int4.linear_int8_intdot(x, w8, s[:, 0])
    torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert cpu_int4.linear_int8_intdot(torch.randn(1, 96).bfloat16(), w8[:, :96].contiguous(), s[:, 0]) is None
    assert cpu_int4.linear_int8_intdot(torch.randn(1, 256), w8, s[:, 0]) is None        # fp32 activations
    assert cpu_int4.linear_int4_intdot(torch.randn(9, 256).bfloat16(), qw, s, z, 128) is None  # > 8 rows


@pytest.mark.parametrize("route", ["intdot", "kernels"])
def test_backend_routes_the_layers(monkeypatch, route):
    """int8_gemv / int4_gemv = intdot runs the integer kernel in the layers' forward, "kernels" the exact ones;
    both stay within TOLERANCE of the exact product, a prefill (9+ rows) is exact either way."""
    monkeypatch.setenv(choose.ENV, f"int8_gemv={route},int4_gemv={route}" if route == "intdot" else route)
    choose.reset()
    try:
        lin = torch.nn.Linear(256, 40).bfloat16()
        l4, l8 = Int4WeightOnlyLinear.from_linear(lin), Int8WeightOnlyLinear.from_linear(lin)
        with torch.no_grad():
            for shape in ((1, 256), (2, 3, 256), (12, 256)):
                x = torch.randn(*shape).bfloat16()
                for layer, fn in ((l4, l4._intdot), (l8, lambda v: cpu_int4.linear_int8_intdot(
                        v, l8.weight_int8, l8.scales))):
                    y = layer(x)
                    ref = F.linear(x.double(), layer.dequantized_weight().double(), layer.bias.double())
                    assert rel_err(y, ref) <= choose.TOLERANCE
                    intdot = fn(x)
                    if intdot is not None:  # decode rows: the route decides which kernel ran
                        assert torch.equal(y, intdot + layer.bias) == (route == "intdot"), (route, shape)
    finally:
        choose.reset()


def test_int4_padded_columns():
    """in_features not a multiple of 128 (the demo's down_proj, 688): the activations are zero-padded to the
    packed width, padding codes meet zeros and add nothing, zero points included."""
    lin = torch.nn.Linear(200, 24).bfloat16()
    layer = Int4WeightOnlyLinear.from_linear(lin)
    x = torch.randn(2, 200).bfloat16()
    y = layer._intdot(x)
    assert y is not None
    w = layer.dequantized_weight(torch.float32)
    assert rel_err(y, quantized_acts(torch.nn.functional.pad(x, (0, 56)), 128)[:, :200] @ w.double().T) <= 2 ** -8


def test_decode_quality_on_the_demo_model(monkeypatch):
    """The demo model (trained: realistic scales) decoded one token at a time, int4 (default AWQ scaling, int8
    head) and int8, on the exact kernels and on the integer ones, against bf16 teacher-forced logits. Integer
    kernels stay close to the exact kernels' own figures (a wrong block scale or nibble order drops top-1 far
    below). These prompts are generic English, which the shapes-only demo model never saw: the exact int4 kernels
    give 92.8 % there on the model shipped 2026-12-06, so the floor is 90 %; the issue's >= 95 % bar is checked on
    the demo's own questions (test_quantized_embedding_vision: 98.1 % with the default int4)."""
    import copy

    from qwen2vl.loading import resolve_name
    from qwen2vl.model import Qwen2VLForConditionalGeneration
    from qwen2vl.processing.tokenizer import AutoTokenizer
    from qwen2vl.quantization import quantize_model
    from qwen2vl.quantization.awq import calibration_ids
    from qwen2vl.quantization.quality import decode_agreement, eval_ids

    model = Qwen2VLForConditionalGeneration.from_pretrained("qwen2vl-demo", dtype="bfloat16")
    prompts = eval_ids(AutoTokenizer.from_pretrained(resolve_name("qwen2vl-demo")))
    stats = {}
    for fmt in ("int4", "int8"):
        q = quantize_model(copy.deepcopy(model), fmt, calibration=calibration_ids(resolve_name("qwen2vl-demo")))
        for route in ("kernel", "intdot"):
            monkeypatch.setenv(choose.ENV, f"int8_gemv={route},int4_gemv={route}")
            choose.reset()
            stats[fmt, route] = decode_agreement(model, q, prompts)
    choose.reset()
    print(stats)
    for fmt in ("int4", "int8"):
        exact, fast = stats[fmt, "kernel"], stats[fmt, "intdot"]
        assert fast["top1"] >= 0.90 and fast["top1"] >= exact["top1"] - 0.02, (fmt, stats)  # int4 exact: 92.8 %
        assert fast["kl"] <= max(2 * exact["kl"], exact["kl"] + 0.005), (fmt, stats)


@pytest.mark.skipif(not cpu.has_avx512bf16(), reason="the fused step's quantized kinds need AVX512-BF16 here")
@pytest.mark.parametrize("fmt,route,fused", [("int4", "intdot", True), ("int4", "kernel", True),
                                             ("int8", "intdot", True), ("int8", "kernel", False)])
def test_fused_decode_step_takes_quantized_layers(monkeypatch, fmt, route, fused):
    """int4 / int8 decoder layers go through the fused decoding step (one kernel call per step) when every
    projection's chosen kernel is one cpu_layer.c has, bit-identical to the per-op path; int8's exact kernel is
    not there (the per-op path runs)."""
    from test_fused_decode import decode, per_op
    from tiny import left_pad, tiny_model

    from qwen2vl.kernels import cpu_ops
    from qwen2vl.quantization import quantize_model

    monkeypatch.setenv(choose.ENV, f"{fmt}_gemv={route}")
    choose.reset()
    model = tiny_model(seed=0, mrope_section=(8, 4, 4), layers=2, intermediate=256, tie=False)  # widths 128 / 256
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else
                    torch.randn(p.shape, generator=g) * 0.2)
    model = quantize_model(model.to(torch.bfloat16), fmt, int4_method="rtn")
    calls = []
    original = cpu_ops.decode_layers
    monkeypatch.setattr(cpu_ops, "decode_layers", lambda *a: calls.append(original(*a)) or calls[-1])
    ids, mask = left_pad([[15, 17, 33, 8, 61], [44, 13, 70]])
    got, _ = decode(model, ids, mask, steps=4)
    assert calls == ([True] * 4 if fused else []), calls
    ref, _ = per_op(monkeypatch, decode, model, ids, mask, 4)
    assert torch.equal(got, ref)
    choose.reset()
