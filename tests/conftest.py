"""Shared fixtures, and a suite-wide guard: a kernel test skipped on a CPU that CAN run its kernel path is turned into a failure.

The CPU kernels' tests skip where a build or an instruction set is missing (AVX2 vs AVX512 build, AVX512-BF16).
A kernel source that stops compiling, or a capability check that regresses, would otherwise only show as more
skipped tests. What this CPU can run is decided here from its flags and the C compiler alone (not from whether
the library loaded), for the build under test (`QWEN2VL_KERNEL_ISA=avx2` picks the AVX2 build on an AVX512 CPU;
`QWEN2VL_DISABLE_KERNELS=1` means no kernel path is expected).
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from qwen2vl.kernels import cpu


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is much faster than contended OpenMP threads on a shared machine
    (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _compiler() -> bool:
    return bool(os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"))


def _avx512bf16() -> bool:
    return cpu.flavour() == "avx512" and "avx512_bf16" in cpu._cpu_flags()


# Skip reason (a prefix of the test's message) → "this CPU / build can run that path".
KERNEL_SKIPS = {
    "no AVX2 / AVX512 CPU or no C compiler": lambda: cpu.flavour() is not None and _compiler(),
    "no AVX512-BF16": _avx512bf16,
    "the vision attention kernel is in the AVX512 build only": lambda: cpu.flavour() == "avx512",
    "needs the CPU kernels' bf16 GEMV": lambda: cpu.flavour() == "avx2" or _avx512bf16(),
    "needs a CPU that runs both kernel builds": lambda: {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}
        <= cpu._cpu_flags() and _compiler(),
    "the fused step's quantized kinds need AVX512-BF16": _avx512bf16,
    "the AVX2 build is the one under test here already":
        lambda: cpu.flavour() == "avx512" and {"avx2", "fma", "f16c"} <= cpu._cpu_flags()
        and os.environ.get("QWEN2VL_KERNEL_ISA", "") != "avx2",
}
_KERNELISH = re.compile(r"avx|bf16|kernel|c compiler", re.IGNORECASE)


def kernel_skip_error(reason: str) -> str | None:
    """Why a skip with `reason` is not acceptable here, or None when it is."""
    if os.environ.get("QWEN2VL_DISABLE_KERNELS", "0") not in ("", "0"):
        return None
    for prefix, can_run in KERNEL_SKIPS.items():
        if reason.startswith(prefix):
            return f"skipped ({reason!r}) although this CPU can run that kernel path" if can_run() else None
    if _KERNELISH.search(reason):
        return f"kernel-related skip reason {reason!r} is not in tests/conftest.py KERNEL_SKIPS: add it there"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        error = kernel_skip_error(reason)
        if error is not None:
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid}: {error}"
