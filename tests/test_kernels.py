"""CPU decode kernels: results equal an fp32 reference (bf16 output rounding only) and fall back cleanly."""
import pytest
import torch

from qwen2vl.kernels.backend import KernelLinear
from qwen2vl.kernels import cpu, cpu_ops
from qwen2vl.quantization import Int8WeightOnlyLinear

needs_kernel = pytest.mark.skipif(cpu.library() is None, reason="no AVX2 / AVX512 CPU or no C compiler")


@needs_kernel
@pytest.mark.parametrize("k", [96, 416])  # 416 = 3 x 128 + 32: the one-row kernel's unrolled loop and its tail
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [40, 43])  # 43: odd shares, so the one-row kernel's lone last row runs too
def test_bf16_gemv_matches_fp32_reference(rows, k, n):
    torch.manual_seed(0)
    lin = KernelLinear(k, n, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 1, k, dtype=torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
        threads = torch.get_num_threads()
        try:  # other splits of the rows among threads (other pairings of the two streams): the same bits
            for t in (1, 3):
                torch.set_num_threads(t)
                assert torch.equal(lin(x), got)
        finally:
            torch.set_num_threads(threads)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, n)
    # fp32 accumulation, one bf16 rounding of the output: relative error <= 2^-8.
    assert ((got.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-3).all()


@needs_kernel
def test_int8_gemv_matches_dequantized_reference():
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 24, bias=False).to(torch.bfloat16))
    assert cpu.linear_int8(torch.randn(9, 64, dtype=torch.bfloat16), q.weight_int8, q.scales) is None
    if cpu.flavour() == "avx512":  # widening int8 costs more than it saves beyond 4 rows there (not on AVX2)
        assert cpu.linear_int8(torch.randn(8, 64, dtype=torch.bfloat16), q.weight_int8, q.scales) is None
    for rows in (1, 2, 4) + ((3, 5, 8) if cpu.flavour() == "avx2" else ()):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        got = cpu.linear_int8(x, q.weight_int8, q.scales)
        ref = x.float() @ (q.weight_int8.float() * q.scales.float()[:, None]).t()
        assert ((got.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-3).all()


def test_fallbacks_keep_torch_semantics():
    torch.manual_seed(0)
    lin = KernelLinear(37, 8).to(torch.bfloat16)          # K not a multiple of 16
    x = torch.randn(1, 37, dtype=torch.bfloat16)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    lin = KernelLinear(32, 8).to(torch.bfloat16)          # autograd needs the torch op
    x = torch.randn(1, 32, dtype=torch.bfloat16, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    big = torch.randn(9, 32, dtype=torch.bfloat16)      # more rows than the kernel takes
    with torch.no_grad():
        assert torch.equal(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))


@needs_kernel
@pytest.mark.parametrize("dtype, d", [(torch.float32, 80), (torch.bfloat16, 80), (torch.bfloat16, 64),
                                      (torch.bfloat16, 96), (torch.bfloat16, 128)])
def test_vision_attention_kernel_matches_reference(dtype, d):
    """Fused rotary + attention over three segments (301 tokens: several query tiles, a partial key block and a
    partial query group; 64; 7) equals the reference computation: rotary in fp32, rounded to the input dtype,
    SDPA per segment. Head dims 64/80/128 take the specialised bf16 loops, 96 the generic one."""
    if cpu.kernel("vision_attention") is None:
        pytest.skip("the vision attention kernel is in the AVX512 build only")
    if dtype == torch.bfloat16 and not cpu.has_avx512bf16():
        pytest.skip("no AVX512-BF16")
    from qwen2vl.model.vision import rotate_half, vision_rotary

    torch.manual_seed(0)
    h, lens = 4, [301, 64, 7]
    n = sum(lens)
    cu = [0, 301, 365, n]
    qkv = torch.randn(n, 3 * h * d).to(dtype)
    pos = torch.randint(0, 20, (n, 2))
    cos, sin = vision_rotary(pos, d)
    got = cpu_ops.vision_attention(qkv, cos, sin, h, d ** -0.5, cu)
    q, k, v = qkv.view(n, 3, h, d).unbind(1)
    q = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(dtype)
    k = (k.float() * cos[:, None] + rotate_half(k.float()) * sin[:, None]).to(dtype)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].float().transpose(0, 1), k[a:b].float().transpose(0, 1), v[a:b].float().transpose(0, 1)
    ).transpose(0, 1) for a, b in zip(cu[:-1], cu[1:])]).reshape(n, h * d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: probabilities rounded to bf16 before P.V
    assert got.dtype == dtype and (got.float() - ref).abs().max().item() <= tol


@needs_kernel
def test_vision_tower_with_kernel_matches_oracle():
    """A grid of 2 x 16 x 18 patches (two temporal segments of 288 tokens) goes through the CPU kernel;
    the tower still equals transformers' (fp32, 1e-4)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import oracle_from, pixels, tiny_model

    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    hf = oracle_from(model)
    grid = torch.tensor([[2, 16, 18]])
    pv = pixels(grid.tolist())
    calls = []
    original = cpu_ops.vision_attention

    def spy(*a, **kw):
        calls.append(a[-1])
        return original(*a, **kw)

    cpu_ops.vision_attention = spy
    try:
        with torch.no_grad():
            ours = model.model.visual(pv, grid)
    finally:
        cpu_ops.vision_attention = original
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
    assert len(calls) == 2 and calls[0] == [0, 288, 576]
    assert (ours - ref).abs().max().item() <= 1e-4


@needs_kernel
@pytest.mark.parametrize("b, hq, hkv, klen, d, masked", [
    (1, 12, 2, 50, 128, False),   # the 2B decoder: GQA 6:1, head_dim 128
    (3, 12, 2, 37, 128, True),    # padded rows / unequal lengths
    (2, 4, 4, 5, 64, True),
    (2, 16, 2, 300, 80, False),   # 8 query heads per KV head
])
def test_decode_attention_kernel_matches_reference(b, hq, hkv, klen, d, masked):
    """One query per row over a strided view of a larger cache equals fp32 SDPA (bf16 output rounding only)."""
    torch.manual_seed(0)
    cache_k = torch.randn(b, hkv, klen + 20, d).bfloat16()
    cache_v = torch.randn(b, hkv, klen + 20, d).bfloat16()
    k, v = cache_k[:, :, :klen], cache_v[:, :, :klen]
    q = torch.randn(b, hq, 1, d).bfloat16()
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, klen) > 0.3
        mask[..., 0] = True
    got = cpu_ops.decode_attention(q, k, v, mask, d ** -0.5)
    rep = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), attn_mask=mask,
        scale=d ** -0.5)
    assert got.shape == (b, hq, 1, d) and got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() <= 1e-2
    assert cpu_ops.decode_attention(q.float(), k.float(), v.float(), mask, d ** -0.5) is None  # fp32: SDPA instead


@needs_kernel
def test_bf16_generation_with_decode_kernel_equals_sdpa_path(monkeypatch):
    """Greedy decoding of a left-padded bf16 batch: the decode-attention kernel gives the tokens of the SDPA path."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import left_pad, tiny_model

    from qwen2vl.model import text

    model = tiny_model(mrope_section=(4, 2, 2)).to(torch.bfloat16)
    ids, mask = left_pad([[15, 17, 33, 8, 61, 12, 9], [44, 13, 70]])
    calls = []
    original = cpu_ops.decode_attention
    monkeypatch.setattr(text, "fused_decode_step", lambda *a: None)  # the per-op path (the fused one: own test)
    monkeypatch.setattr(cpu_ops, "decode_attention", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        fast = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    monkeypatch.setattr(cpu_ops, "decode_attention", lambda *a: None)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert calls and torch.equal(fast, ref)


@needs_kernel
@pytest.mark.parametrize("b, hq, hkv, s, past, d", [
    (1, 12, 2, 300, 0, 128),     # the 2B decoder's prefill shape: several query tiles, partial key block
    (2, 4, 2, 70, 30, 64),       # continuing after cached tokens (causal offset)
    (1, 8, 8, 131, 0, 80),       # generic head-dim loop
    (3, 12, 2, 65, 200, 128),
])
def test_prefill_attention_kernel_matches_reference(b, hq, hkv, s, past, d):
    """Causal attention of S new tokens over past + S strided cache keys equals fp32 SDPA (bf16 rounding only)."""
    if not cpu.has_avx512bf16():
        pytest.skip("no AVX512-BF16")
    torch.manual_seed(0)
    k = torch.randn(b, hkv, past + s + 10, d).bfloat16()[:, :, :past + s]
    v = torch.randn(b, hkv, past + s + 10, d).bfloat16()[:, :, :past + s]
    q = torch.randn(b, s, hq, d).bfloat16().transpose(1, 2)
    got = cpu_ops.prefill_attention(q, k, v, d ** -0.5)
    rep = hq // hkv
    mask = torch.ones(s, past + s, dtype=torch.bool).tril(past)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), attn_mask=mask,
        scale=d ** -0.5)
    assert got.shape == (b, hq, s, d) and (got.float() - ref).abs().max().item() <= 2e-2


@needs_kernel
def test_bias_quick_gelu_kernel_matches_reference():
    """In-place quick_gelu(x + bias) on bf16 equals the fp32 computation up to one bf16 rounding."""
    from qwen2vl.model.vision import quick_gelu

    torch.manual_seed(0)
    x = (torch.randn(37, 160) * 4).bfloat16()
    bias = torch.randn(160).bfloat16()
    ref = quick_gelu(x.float() + bias.float())
    y = x.clone()
    assert cpu_ops.bias_quick_gelu_(y, bias)
    assert ((y.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()
    assert not cpu_ops.bias_quick_gelu_(x.float(), bias)  # fp32: the torch path instead
    assert not cpu_ops.bias_quick_gelu_(x[:, :150].contiguous(), bias[:150])  # width not a multiple of 16


def test_prepacked_linear_is_linear_and_follows_weight_changes():
    """bf16 inference with oneDNN's prepacked weight equals F.linear bit for bit; the packed copy is rebuilt after
    the weight changes, never saved, and fp32 / few rows / autograd use F.linear."""
    from qwen2vl.kernels.prepacked import PrepackedLinear

    torch.manual_seed(0)
    lin = PrepackedLinear(64, 48).to(torch.bfloat16)
    x = torch.randn(100, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        assert torch.equal(lin(x), ref)
        packed = lin.packed_weight(x)
        assert packed is None or packed.is_mkldnn  # None only on torch builds without oneDNN
        assert torch.equal(lin(x, with_bias=False), torch.nn.functional.linear(x, lin.weight))
        lin.weight.mul_(2)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert lin.packed_weight(x[:8]) is None and lin.packed_weight(x.float()) is None
    assert set(lin.state_dict()) == {"weight", "bias"}
    lin.weight.requires_grad_(True)
    assert lin.packed_weight(x) is None
    with torch.inference_mode():  # weights made under inference_mode have no version counter
        inf = PrepackedLinear(64, 48).to(torch.bfloat16)
        assert torch.equal(inf(x), torch.nn.functional.linear(x, inf.weight, inf.bias))


@needs_kernel
def test_rms_norm_kernel_matches_reference_ops():
    """The decoder RMSNorm kernel reproduces the reference's bf16 ops (fp32 statistics, bf16 cast, weight multiply)
    — bit for bit except where a different fp32 summation order flips a rounding."""
    torch.manual_seed(0)
    x = (torch.randn(3, 70, 160) * 3).bfloat16()
    w = torch.randn(160).bfloat16()
    got = cpu_ops.rms_norm(x, w, 1e-6)
    x32 = x.float()
    ref = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and (got == ref).float().mean().item() >= 0.999
    assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7).all()
    assert cpu_ops.rms_norm(x.float(), w, 1e-6) is None and cpu_ops.rms_norm(x[..., :150].contiguous(), w[:150], 1e-6) is None


@needs_kernel
@pytest.mark.parametrize("b, s, h, d", [(1, 1, 12, 128), (2, 70, 3, 16), (1, 300, 12, 128)])
def test_rope_kernel_is_bit_identical_to_reference_ops(b, s, h, d):
    """Decoder rotary embedding in one call per tensor: bf16 x*cos + rotate_half(x)*sin, bit for bit (the kernel
    rounds after each of the three ops as torch does); other dtypes / layouts fall back (None)."""
    from qwen2vl.model.vision import rotate_half

    torch.manual_seed(0)
    x = torch.randn(b, s, h * d, dtype=torch.bfloat16) * 3
    f = torch.randn(b, s, d // 2) * 50
    f = torch.cat([f, f], -1)
    cos, sin = f.cos().bfloat16(), f.sin().bfloat16()
    got = cpu_ops.rope(x, cos, sin, d)
    xv = x.view(b, s, h, d).transpose(1, 2)
    ref = (xv * cos.unsqueeze(1) + rotate_half(xv) * sin.unsqueeze(1)).transpose(1, 2).reshape(b, s, h * d)
    assert torch.equal(got, ref)
    assert cpu_ops.rope(x.float(), cos, sin, d) is None
    assert cpu_ops.rope(x, cos.float(), sin.float(), d) is None
    wide = torch.randn(2, 3, 2 * h * d, dtype=torch.bfloat16)
    c3 = torch.ones(2, 3, d, dtype=torch.bfloat16)
    assert cpu_ops.rope(wide[..., :h * d], c3, c3, d) is None  # not contiguous
    assert cpu_ops.rope(wide[..., :h * d].contiguous(), c3, c3, d) is not None


@needs_kernel
def test_silu_mul_kernel_is_bit_identical_to_torch():
    """The decoder MLP's activation in one pass: bf16(bf16(silu(gate)) * up) equals torch's bf16
    F.silu(gate).mul_(up) bit for bit, over normal values at several scales and the edges (inf, nan, -0,
    gates below -87 where silu underflows to zero)."""
    torch.manual_seed(0)
    for scale in (1.0, 6.0, 60.0):
        gate = (torch.randn(3, 8192) * scale).bfloat16()
        up = torch.randn(3, 8192).bfloat16()
        ref = torch.nn.functional.silu(gate).mul_(up)
        got = gate.clone()
        assert cpu_ops.silu_mul_(got, up)
        assert torch.equal(got, ref)
    edge = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, -87.5, -88.8, -200.0, 88.8,
                         1e-30, -1e-30, 3.0, -3.0, 20.0, -20.0, 0.5]).bfloat16()
    got = edge.clone()
    assert cpu_ops.silu_mul_(got, torch.ones_like(edge))
    ref = torch.nn.functional.silu(edge)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[~ref.isnan()], ref[~ref.isnan()])
    assert not cpu_ops.silu_mul_(gate.float(), up.float())                 # fp32: the torch ops instead
    assert not cpu_ops.silu_mul_(gate[:, :8], up[:, :8])                   # not contiguous
    assert not cpu_ops.silu_mul_(gate[:1, :40].contiguous(), up[:1, :40].contiguous())  # 40 % 16 != 0


def test_kernels_build_where_the_cpu_can_run_them():
    """A CPU with AVX2 or AVX512 and a C compiler must get the library (a source that stops compiling would
    otherwise only show as skipped kernel tests)."""
    import shutil

    if cpu.flavour() is None or not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no AVX2 / AVX512 CPU or no C compiler")
    assert cpu.library() is not None
    assert cpu.has_bf16_gemv() == (cpu.flavour() == "avx2" or cpu.has_avx512bf16())


def test_avx2_build_on_an_avx512_cpu():
    """On an AVX512 machine the AVX2 build (QWEN2VL_KERNEL_ISA=avx2) runs the kernel and fused-decoding tests too,
    so both builds are tested wherever CI lands."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if cpu.flavour() != "avx512" or not {"avx2", "fma", "f16c"} <= cpu._cpu_flags():
        pytest.skip("the AVX2 build is the one under test here already (or this CPU has neither)")
    here = Path(__file__).parent
    env = dict(os.environ, QWEN2VL_KERNEL_ISA="avx2")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not avx2_build",
                           str(here / "test_kernels.py"), str(here / "test_fused_decode.py"),
                           str(here / "test_int4_kernels.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout
