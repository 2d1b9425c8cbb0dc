"""tests/conftest.py turns a kernel test's skip into a failure where this CPU can run that kernel path."""
import pytest

import conftest
from qwen2vl.kernels import cpu


@pytest.mark.parametrize("isa, flags, reason, fails", [
    ("avx512", {"avx512_bf16"}, "no AVX512-BF16", True),
    ("avx512", set(), "no AVX512-BF16", False),
    ("avx2", {"avx512_bf16"}, "no AVX512-BF16", False),                  # the AVX2 build has no such path
    ("avx2", set(), "the vision attention kernel is in the AVX512 build only", False),
    ("avx512", set(), "the vision attention kernel is in the AVX512 build only", True),
    ("avx2", set(), "needs the CPU kernels' bf16 GEMV (AVX512-BF16 or the AVX2 build)", True),
    ("avx512", set(), "needs the CPU kernels' bf16 GEMV (AVX512-BF16 or the AVX2 build)", False),
    (None, set(), "no AVX2 / AVX512 CPU or no C compiler", False),
    ("avx2", set(), "no AVX2 / AVX512 CPU or no C compiler", True),
    ("avx2", set(), "some new AVX512 kernel is missing", True),         # unknown kernel reason: must be listed
    ("avx2", set(), "needs a CUDA GPU", False),
])
def test_kernel_skips_fail_where_the_cpu_can_run_them(monkeypatch, isa, flags, reason, fails):
    monkeypatch.delenv("QWEN2VL_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "flavour", lambda: isa)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: flags | {"avx2", "fma", "f16c"})
    monkeypatch.setattr(conftest, "_compiler", lambda: True)
    assert (conftest.kernel_skip_error(reason) is not None) == fails
    monkeypatch.setenv("QWEN2VL_DISABLE_KERNELS", "1")
    assert conftest.kernel_skip_error(reason) is None
