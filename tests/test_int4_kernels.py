"""The int4 layer's arithmetic: the packed layout, the 4-bit GEMV kernel and every forced "int4_gemv" backend
against an fp32 dequantize-then-matmul reference, GPTQ act-order, and bad shapes / codes named clearly. Runs on
the AVX2 build too (tests/test_kernels.py::test_avx2_build_on_an_avx512_cpu)."""
import pytest
import torch
import torch.nn.functional as F

from qwen2vl.kernels import choose, cpu, cpu_int4
from qwen2vl.quantization import Int4WeightOnlyLinear
from qwen2vl.quantization.int4 import pack_nibbles, unpack_nibbles

pytestmark = pytest.mark.usefixtures("one_thread")


def close(y, ref, tol=2 ** -7):
    """Within bf16 rounding of the fp32 reference, relative to its largest value."""
    return y.shape == ref.shape and (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


def random_layer(out=48, k=256, group=128, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, k), generator=g, dtype=torch.uint8)
    n_groups = -(-k // group)
    scales = torch.rand(out, n_groups, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (out, n_groups), generator=g)
    b = torch.randn(out, generator=g) if bias else None
    w = (q.float() - zeros.float().repeat_interleave(group, 1)[:, :k]) * scales.repeat_interleave(group, 1)[:, :k]
    return Int4WeightOnlyLinear.from_unpacked(q, scales, zeros, group, bias=b), w, b


def test_packed_layout_is_the_documented_one():
    """Lane l (bytes 2l, 2l + 1) of a 128-column block holds columns l, 32 + l, 64 + l, 96 + l in nibbles 0..3."""
    q = torch.zeros(1, 128, dtype=torch.uint8)
    q[0, 5], q[0, 37], q[0, 69], q[0, 101] = 1, 2, 3, 4
    packed = pack_nibbles(q)
    assert packed.shape == (1, 64)
    assert packed[0, 10].item() == 1 | (2 << 4) and packed[0, 11].item() == 3 | (4 << 4)
    assert int(packed.sum()) == packed[0, 10].item() + packed[0, 11].item()
    codes = torch.randint(0, 16, (3, 300), dtype=torch.uint8)  # padded to 384 columns
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 300), codes)


def test_from_unpacked_and_from_linear_hold_the_weight():
    layer, w, _ = random_layer(k=200, group=64)
    assert torch.equal(layer.dequantized_weight(torch.float32), w)
    lin = torch.nn.Linear(256, 32).bfloat16()
    q = Int4WeightOnlyLinear.from_linear(lin, group_size=128)
    err = (q.dequantized_weight(torch.float32) - lin.weight.float()).abs()
    step = q.scales.repeat_interleave(128, 1)  # round-to-nearest: within half a step (+ bf16 of the input)
    assert bool((err <= step / 2 + 1e-3).all())


def test_kernel_matches_reference_every_row_count():
    if not cpu_int4.usable(256, 128):
        pytest.skip("needs the CPU kernels' bf16 GEMV (AVX512-BF16 or the AVX2 build)")
    for out, k, group in ((48, 256, 128), (37, 384, 128), (16, 512, 256)):
        layer, w, _ = random_layer(out, k, group, bias=False, seed=out)
        for rows in range(1, 9):
            x = torch.randn(rows, k).bfloat16()
            with torch.no_grad():
                y = layer._kernel(x)
            assert y is not None and y.dtype == torch.bfloat16
            assert close(y, x.float() @ w.T), (out, k, group, rows)


@pytest.mark.parametrize("route", ["kernels", "torch", "int4_gemv=torch", "auto"])
def test_every_backend_matches_reference(monkeypatch, route):
    monkeypatch.setenv(choose.ENV, route)
    choose.reset()
    try:
        layer, w, b = random_layer(out=48, k=256)
        with torch.no_grad():
            for shape in ((1, 256), (2, 3, 256), (8, 256), (40, 256)):  # decode rows and a prefill
                x = torch.randn(*shape).bfloat16()
                assert close(layer(x), F.linear(x.float(), w, b)), (route, shape)
            x = torch.randn(3, 256)  # fp32 activations: the dequantize path in fp32 (bias stored in bf16)
            assert close(layer.to(torch.float32)(x), F.linear(x, w, layer.bias.float()), 1e-5)
    finally:
        choose.reset()


def test_dtype_casts_keep_fp32_scales():
    layer, w, b = random_layer(out=32, k=256)
    layer.half().bfloat16()
    assert layer.scales.dtype == torch.float32 and layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    x = torch.randn(2, 256).bfloat16()
    with torch.no_grad():
        assert close(layer(x), F.linear(x.float(), w, layer.bias.float()))


def test_torch_int4_candidate_matches_reference():
    layer, w, b = random_layer(out=32, k=256)
    x = torch.randn(2, 256).bfloat16()
    with torch.no_grad():
        assert close(layer._torch_int4(x) + b, F.linear(x.float(), w, b), 2 ** -6)


def test_act_order_g_idx():
    """GPTQ desc_act: column i belongs to group g_idx[i]; the layer permutes columns once and gathers x."""
    g = torch.Generator().manual_seed(3)
    out, k, group = 32, 256, 128
    q = torch.randint(0, 16, (out, k), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(out, 2, generator=g) * 0.01, torch.randint(0, 16, (out, 2), generator=g)
    g_idx = torch.randperm(k, generator=g) // group
    layer = Int4WeightOnlyLinear.from_unpacked(q, scales, zeros, group, g_idx=g_idx)
    w = (q.float() - zeros.float()[:, g_idx]) * scales[:, g_idx]
    assert layer.input_perm is not None and torch.equal(layer.dequantized_weight(torch.float32), w)
    with torch.no_grad():
        for rows in (1, 5, 20):
            x = torch.randn(rows, k).bfloat16()
            assert close(layer(x), x.float() @ w.T), rows


def test_bad_inputs_named():
    q = torch.randint(0, 16, (8, 256), dtype=torch.uint8)
    s, z = torch.ones(8, 2), torch.full((8, 2), 8)
    with pytest.raises(ValueError, match="0..15"):
        Int4WeightOnlyLinear.from_unpacked(q.int() + 16, s, z, 128)
    with pytest.raises(ValueError, match=r"scales and zeros must be \(8, 2\)"):
        Int4WeightOnlyLinear.from_unpacked(q, torch.ones(8, 3), z, 128)
    with pytest.raises(ValueError, match="integer zero points"):
        Int4WeightOnlyLinear.from_unpacked(q, s, z + 0.5, 128)
    with pytest.raises(ValueError, match="g_idx"):
        Int4WeightOnlyLinear.from_unpacked(q, s, z, 128, g_idx=torch.zeros(256, dtype=torch.long))
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyLinear(256, 8, group_size=0)
    layer = Int4WeightOnlyLinear.from_unpacked(q, s, z, 128)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 256\)"):
        layer(torch.randn(1, 255).bfloat16())


def test_kernel_rejects_shapes_it_cannot_do():
    """K or the group size not a multiple of 128: the wrapper says no (None) and the layer falls back; the C
    entry point itself returns -1 rather than reading out of bounds."""
    assert not cpu_int4.usable(192, 64) and not cpu_int4.usable(256, 64)
    layer, w, _ = random_layer(out=16, k=192, group=64, bias=False)
    x = torch.randn(2, 192).bfloat16()
    assert cpu_int4.linear_int4(x, layer.qweight, layer.scales, layer.zeros, 64) is None
    with torch.no_grad():
        assert close(layer(x), x.float() @ w.T)
    name = cpu_int4._fn()
    if name is None:
        pytest.skip("needs the CPU kernels' bf16 GEMV (AVX512-BF16 or the AVX2 build)")
    fn = cpu.kernel(name)
    y = torch.empty(2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K % 128"):  # the op refuses before reaching C
        torch.ops.qwen2vl.gemv_int4(x, layer.qweight, layer.scales, layer.zeros, 64)
    assert fn(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(), layer.zeros.data_ptr(),
              y.data_ptr(), 2, 16, 192, 64, 1) == -1
    assert fn(x.data_ptr(), layer.qweight.data_ptr(), layer.scales.data_ptr(), layer.zeros.data_ptr(),
              y.data_ptr(), 9, 16, 256, 128, 1) == -1


def test_dequantize_kernel_equals_torch():
    if cpu.kernel("dequant_q4_bf16") is None:
        pytest.skip("no AVX2 / AVX512 CPU or no C compiler")
    layer, w, _ = random_layer(out=40, k=512, group=128)
    tile = cpu_int4.dequantize_bf16(layer.qweight, layer.scales, layer.zeros, 512, 128)
    assert torch.equal(tile, w.to(torch.bfloat16))
