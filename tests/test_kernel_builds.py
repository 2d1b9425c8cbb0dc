"""The kernels written once on cpu_vec16.h's 16-lane vectors (decoding attention, RMSNorm, SiLU * up, bias +
quick-GELU, and the exp polynomial they share) give the AVX512 and the AVX2 library the same bits: both builds are
compiled and loaded side by side and called on the same inputs (their accuracy against torch: test_kernels.py)."""
import shutil

import pytest
import torch

from qwen2vl.kernels import build, cpu

BOTH = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}
pytestmark = pytest.mark.skipif(not (BOTH <= cpu._cpu_flags() and (shutil.which("gcc") or shutil.which("cc"))),
                                reason="needs a CPU that runs both kernel builds and a C compiler")


@pytest.fixture(scope="module")
def libs():
    return [build.load(build.compile_flavour(isa, build.compiler())) for isa in ("avx512", "avx2")]


def ptr(t):
    return t.data_ptr() if t is not None else None


def decode_attention(lib, q, k, v, mask, scale):
    b, hq, d = q.shape
    out = torch.empty(b, hq, d, dtype=torch.bfloat16)
    rc = lib.decode_attention(ptr(q), ptr(k), ptr(v), ptr(mask), ptr(out), b, hq, k.shape[1], k.shape[2], d,
                              q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], scale, 2)
    assert rc == 0
    return out


@pytest.mark.parametrize("b, hq, hkv, klen, d, masked", [
    (1, 12, 2, 50, 128, False),   # 6 query heads per KV head
    (3, 12, 2, 37, 128, True),    # padded rows
    (2, 16, 2, 300, 80, False),   # 8 per KV head
    (2, 27, 3, 129, 64, True),    # 9 per KV head: two groups of heads; keys past a 16-lane block
    (1, 4, 4, 3, 16, False),      # fewer keys than one vector
])
def test_decode_attention_same_bits_on_both_builds(libs, b, hq, hkv, klen, d, masked):
    g = torch.Generator().manual_seed(klen)
    cache_k = (torch.randn(b, hkv, klen + 7, d, generator=g) * 3).bfloat16()  # wide scores: exp far from 0 too
    cache_v = torch.randn(b, hkv, klen + 7, d, generator=g).bfloat16()
    q = torch.randn(b, hq, d, generator=g).bfloat16()
    mask = None
    if masked:
        mask = (torch.rand(b, klen, generator=g) > 0.3).to(torch.uint8)
        mask[:, 0] = 1
    k, v = cache_k[:, :, :klen], cache_v[:, :, :klen]
    fast, port = (decode_attention(lib, q, k, v, mask, d ** -0.5) for lib in libs)
    assert torch.equal(fast, port)
    assert fast.abs().max() > 0


def test_decode_attention_summation_order_is_the_same_on_both_builds(libs):
    """Large, nearly equal scores (keys near one direction, queries along it): an ulp of a score moves the
    probabilities enough that a sum in another order (the old 8-lane AVX2 kernel's) changed 170 of these 3072 bf16
    outputs; the one source on v16 must change none."""
    g = torch.Generator().manual_seed(0)
    b, hkv, rep, klen, d = 2, 2, 6, 257, 128
    base = torch.randn(d, generator=g) * 16
    k = (base + 0.02 * torch.randn(b, hkv, klen, d, generator=g)).bfloat16()
    q = (base + torch.randn(b, hkv * rep, d, generator=g)).bfloat16()
    v = torch.randn(b, hkv, klen, d, generator=g).bfloat16()
    fast, port = (decode_attention(lib, q, k, v, None, d ** -0.5) for lib in libs)
    assert torch.equal(fast, port)


def test_elementwise_same_bits_on_both_builds(libs):
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([-100.0, -88.0, -87.0, -50.0, -1e-3, 0.0, 3.0, 100.0]).repeat(32)  # exp's clamp and 0
    x = torch.cat([torch.randn(6, 256, generator=g) * 4, edges[None]]).bfloat16()
    up, w = torch.randn(7, 256, generator=g).bfloat16(), torch.randn(256, generator=g).bfloat16()
    bias = torch.randn(256, generator=g)
    outs = []
    for lib in libs:
        gate, gelu, normed = x.clone(), x.clone(), torch.empty_like(x)
        assert lib.silu_mul(ptr(gate), ptr(up), gate.numel(), 2) == 0
        assert lib.bias_quick_gelu(ptr(gelu), ptr(bias), 7, 256, 2) == 0
        assert lib.rms_norm(ptr(x), ptr(w), ptr(normed), 7, 256, 1e-6, 2) == 0
        outs.append((gate, gelu, normed))
    for a, b in zip(*outs):
        assert torch.equal(a, b) and not torch.equal(a, x)
