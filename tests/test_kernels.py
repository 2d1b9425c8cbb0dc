"""CPU decode kernels: results equal an fp32 reference (bf16 output rounding only) and fall back cleanly."""
import pytest
import torch

from qwen2vl.kernels import cpu
from qwen2vl.quantization import Int8WeightOnlyLinear

needs_kernel = pytest.mark.skipif(cpu.library() is None, reason="no AVX512F CPU or no C compiler")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_bf16_gemv_matches_fp32_reference(rows):
    torch.manual_seed(0)
    lin = cpu.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, 40)
    # fp32 accumulation, one bf16 rounding of the output: relative error <= 2^-8.
    assert ((got.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-3).all()


@needs_kernel
def test_int8_gemv_matches_dequantized_reference():
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 24, bias=False).to(torch.bfloat16))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    got = cpu.linear_int8(x, q.weight_int8, q.scales)
    ref = x.float() @ (q.weight_int8.float() * q.scales.float()[:, None]).t()
    assert ((got.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-3).all()


def test_fallbacks_keep_torch_semantics():
    torch.manual_seed(0)
    lin = cpu.Linear(37, 8).to(torch.bfloat16)          # K not a multiple of 16
    x = torch.randn(1, 37, dtype=torch.bfloat16)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    lin = cpu.Linear(32, 8).to(torch.bfloat16)          # autograd needs the torch op
    x = torch.randn(1, 32, dtype=torch.bfloat16, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    big = torch.randn(9, 32, dtype=torch.bfloat16)      # more rows than the kernel takes
    with torch.no_grad():
        assert torch.equal(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))
