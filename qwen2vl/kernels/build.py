"""Building and loading the C kernel library, and what this CPU can run.

The sources are compiled on first use with the system C compiler (`$CC`, else gcc, else cc) into the cache
folder (`settings().cache_dir`/kernels), as one of two builds picked by the CPU (`flavour`), and loaded through
ctypes (no torch headers, so no torch-version coupling). The AVX512 build took 6.8 s on a busy 2-core Zen 4 (about
3 s idle); later loads find the file in the cache. The file name carries a digest of the sources, the flags and
the compiler's identity (its path and `--version`), so a changed compiler builds afresh; builds no process loaded for
STALE_DAYS days are removed. No compiler, no AVX2, or a failed build: the library is None, logged once, and every
op runs its PyTorch reference (`backend.py`). Why first use and not install time: docs/DESIGN.md, "Kernels".
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..settings import settings

log = logging.getLogger(__name__)
_DIR = Path(__file__).parent
# Two builds of the library: AVX512 (the bf16 dot-product kernels need AVX512-BF16 too; `has_avx512bf16`) and
# AVX2 + FMA (cpu_avx2.c: the decoding GEMV, the same entry points). cpu_rope.c / cpu_layer.c / cpu_int4.c,
# cpu_intdot.c, and cpu_elementwise.c / cpu_decode.c (written once on cpu_vec16.h's 16-lane vectors: one __m512 or
# two __m256) go in both.
FLAVOURS = {
    "avx512": (["cpu_gemv.c", "cpu_attention.c"], ["-mavx512f", "-mavx512bw", "-mavx512vl"]),
    "avx2": (["cpu_avx2.c"], ["-mavx2", "-mfma", "-mf16c"]),
}
SHARED_SRCS = ["cpu_rope.c", "cpu_layer.c", "cpu_int4.c", "cpu_intdot.c", "cpu_elementwise.c", "cpu_decode.c"]
HEADERS = ["cpu_common.h", "cpu_vec16.h", "qwen2vl_kernels.h"]
HEADER = _DIR / "qwen2vl_kernels.h"
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
_P, _I, _F, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_GEMV = [_P] * 4 + [_I] * 3 + [_N]
# name: ctypes argument types, in the order of qwen2vl_kernels.h (every function returns an int status, 0 = done).
C_FUNCTIONS: dict[str, list] = {
    "gemv_bf16": _GEMV, "gemv_i8": _GEMV,
    "gemv_bf16_dp": _GEMV + [_P, _N], "gemv_i8_dp": _GEMV + [_P, _N],
    "decode_attention": [_P] * 5 + [_I] * 13 + [_F, _N],
    "prefill_attention": [_P] * 4 + [_I] * 15 + [_F, _N],
    "vision_attention": [_P] * 4 + [_I] * 3 + [_F, _N, _N, _I, _I, _I, _I],
    "rms_norm": [_P] * 3 + [_I] * 2 + [_F, _N],
    "rope_bf16": [_P] * 4 + [_I] * 3 + [_N],
    "bias_quick_gelu": [_P, _P, _I, _I, _N],
    "silu_mul": [_P, _P, _I, _N],
    "decode_layers": [_P, _I] + [_P] * 5 + [_I] + [_P] * 3 + [_I] * 6 + [_F] * 2 + [_N] + [_P, _P, _I, _N],
    "gemv_q4_avx512bf16": [_P] * 5 + [_I] * 4 + [_N], "gemv_q4_avx2": [_P] * 5 + [_I] * 4 + [_N],
    "dequant_q4_bf16": [_P] * 4 + [_I] * 3 + [_N] * 2,
    "gemv_i8_intdot": [_P] * 4 + [_I] * 3 + [_N] * 2,
    "gemv_q4_intdot": [_P] * 5 + [_I] * 4 + [_N] * 2,
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
why_not: str | None = None  # why the library is None (logged once)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags, read once (reading the file costs ~0.4 ms)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def flavour() -> str | None:
    """Which build of the library this CPU runs: "avx512", "avx2", or None (no kernels). QWEN2VL_KERNEL_ISA=avx2
    picks the AVX2 build on an AVX512 CPU (to test it there)."""
    flags = cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if settings().kernel_isa == "avx2":
        return "avx2" if avx2 else None
    return "avx512" if avx512 else "avx2" if avx2 else None


def has_avx512bf16() -> bool:
    """AVX512-BF16 dot products (Zen 4+, Cooper Lake / Sapphire Rapids+) in the library this CPU runs."""
    return flavour() == "avx512" and "avx512_bf16" in cpu_flags()


@functools.cache
def has_native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates a bf16 matmul,
    and an fp32 one on widened operands is several times faster (measured on a 2-core Zen 3: 21 vs 160 GFLOP/s)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) or platform.machine() not in ("x86_64", "AMD64")


def cache_dir() -> Path:
    return Path(settings().cache_dir) / "kernels"


def compiler() -> str | None:
    return settings().cc or shutil.which("gcc") or shutil.which("cc")


@functools.cache
def compiler_identity(cc: str) -> str:
    """The compiler's resolved path and the first line of its `--version` (part of the build's cache key)."""
    path = shutil.which(cc) or cc
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{os.path.realpath(path)} {version.splitlines()[0] if version else ''}"


def target_name(isa: str, cc: str) -> str:
    srcs, isa_flags = FLAVOURS[isa]
    paths = [_DIR / n for n in srcs + SHARED_SRCS + HEADERS]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in paths) + " ".join(_FLAGS + isa_flags).encode()
                            + compiler_identity(cc).encode()).hexdigest()[:16]
    return f"cpu_{isa}-{digest}.so"


STALE_DAYS = 14  # a build no process loaded for this long is removed


def _prune(keep: Path) -> None:
    """Remove builds no process loaded for STALE_DAYS (each load touches its file; several installs or worktrees
    of different versions share the cache folder, so a build is never removed just for being another one)."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in keep.parent.glob("cpu_*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def compile_flavour(isa: str, cc: str) -> Path:
    """The cached build `isa` of the library (compiled now if absent); RuntimeError with the compiler's message if
    it does not compile. Either build can be made on a CPU that runs both (tests compare their bits)."""
    srcs, isa_flags = FLAVOURS[isa]
    target = cache_dir() / target_name(isa, cc)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *_FLAGS, *isa_flags, "-o", str(out), *(str(_DIR / n) for n in srcs + SHARED_SRCS)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"the kernels did not compile ({proc.stderr.strip()[:300]})")
            os.replace(out, target)  # atomic: concurrent builders never see a partial file
    else:
        try:
            os.utime(target)  # last use, for _prune
        except OSError:
            pass
    _prune(target)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, every exported function typed from C_FUNCTIONS."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in C_FUNCTIONS.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


def _build() -> ctypes.CDLL | None:
    global why_not
    cc, isa = compiler(), flavour()
    if isa is None:
        why_not = "no AVX2 / AVX512 CPU"
        return None
    if cc is None:
        why_not = "no C compiler"
        return None
    try:
        target = compile_flavour(isa, cc)
    except RuntimeError as exc:
        why_not = str(exc)
        return None
    return load(target)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (built on first use; `why_not` says why)."""
    global _lib, _tried, why_not
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if settings().disable_kernels:
                _lib, why_not = None, "QWEN2VL_DISABLE_KERNELS is set"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # a broken toolchain must never break inference
                    _lib, why_not = None, f"the kernels could not be loaded ({exc})"
                if _lib is None and why_not and not settings().disable_kernels and flavour() is not None:
                    log.warning("qwen2vl: %s: using PyTorch ops", why_not)
            _tried = True
    return _lib


def kernel(name: str):
    """The library's function `name`, or None without the library or where its build lacks it."""
    lib = library()
    return getattr(lib, name, None) if lib is not None else None
