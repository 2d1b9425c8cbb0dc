"""Every environment variable qwen2vl reads, in one documented place.

`settings()` reads `os.environ` each time it is called and returns a frozen `Settings`; code reads it where a
decision is taken once (model load, kernel build, process start), never per call on a hot path. Tests change a
variable with monkeypatch and call the function again.

    QWEN2VL_BACKEND          which implementation runs each CPU op: "auto" (measured, kernels/choose.py),
                             "kernels", "torch", or per op "vision_linear=torch,decode_gemv=kernel"
    QWEN2VL_DISABLE_KERNELS  1: never build or load the C kernels (every op runs its PyTorch reference)
    QWEN2VL_KERNEL_ISA       "avx2": use the AVX2 build of the kernels on an AVX512 CPU (testing it there)
    QWEN2VL_DISABLE_PREPACK  1: the vision tower's linears do not keep oneDNN's prepacked weight copy
    QWEN2VL_CHOOSE_BUDGET    seconds the chooser may spend timing candidates per process (default 2)
    QWEN2VL_CACHE            cache folder (default ~/.cache/qwen2vl): compiled kernels, choices.json
    CC                       the C compiler that builds the kernels (default gcc, else cc)
    QWEN2VL_HUGEPAGES        0: do not advise huge pages for weights copied out of the checkpoint
    QWEN2VL_TP_BACKEND       torch.distributed backend for tensor parallelism (default nccl on CUDA, else gloo)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_FALSE = ("", "0")


@dataclass(frozen=True)
class Settings:
    backend: str = ""                 # QWEN2VL_BACKEND, stripped ("" = auto)
    disable_kernels: bool = False     # QWEN2VL_DISABLE_KERNELS
    kernel_isa: str = ""              # QWEN2VL_KERNEL_ISA
    disable_prepack: bool = False     # QWEN2VL_DISABLE_PREPACK
    choose_budget: str = ""           # QWEN2VL_CHOOSE_BUDGET, unparsed (kernels/choose.py checks it)
    cache_dir: str = ""               # QWEN2VL_CACHE, or ~/.cache/qwen2vl
    cc: str = ""                      # CC
    hugepages: bool = True            # QWEN2VL_HUGEPAGES
    tp_backend: str = ""              # QWEN2VL_TP_BACKEND ("" = by device)


def settings(environ=None) -> Settings:
    """The current settings, read from `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    return Settings(
        backend=env.get("QWEN2VL_BACKEND", "").strip(),
        disable_kernels=env.get("QWEN2VL_DISABLE_KERNELS", "0").strip() not in _FALSE,
        kernel_isa=env.get("QWEN2VL_KERNEL_ISA", "").strip(),
        disable_prepack=env.get("QWEN2VL_DISABLE_PREPACK", "0").strip() not in _FALSE,
        choose_budget=env.get("QWEN2VL_CHOOSE_BUDGET", "").strip(),
        cache_dir=env.get("QWEN2VL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2vl"),
        cc=env.get("CC", ""),
        hugepages=env.get("QWEN2VL_HUGEPAGES", "1").strip() != "0",
        tp_backend=env.get("QWEN2VL_TP_BACKEND", "").strip(),
    )
