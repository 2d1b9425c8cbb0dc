"""CPU kernels via a small C library: building it, and the bf16 / int8 weight GEMV for the few-rows case
(decoding) behind `linear` / `Linear`. The attention and elementwise kernels' wrappers are in `cpu_ops.py`.

PyTorch's bf16 matmul with 1-8 activation rows reads weights at a fraction of memory bandwidth on CPUs without
AMX (measured: 3-5 GB/s vs ~20 GB/s on AVX512, ~20 of ~40 GB/s on AVX2), and decoding is nothing but such
matmuls. The C sources are compiled once with the system C compiler into a per-user cache, as the AVX512 or the
AVX2 build (`flavour`; cpu_int4.c: the 4-bit GEMV, wrapped in cpu_int4.py), and called through ctypes (no torch
headers, ~1 s build). Anything they cannot do (no AVX2, no compiler, autograd, odd shapes, > 8 rows) falls back to
torch.
Set QWEN2VL_DISABLE_KERNELS=1 to always use torch.
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
from pathlib import Path

import torch
import torch.nn.functional as F

from . import choose

log = logging.getLogger(__name__)
_DIR = Path(__file__).parent
# Two builds of the library: AVX512 (the bf16 dot-product kernels need AVX512-BF16 too; `has_avx512bf16`) and
# AVX2 + FMA (cpu_avx2.c: the decoding kernels only, the same entry points). cpu_rope.c / cpu_layer.c / cpu_int4.c
# / cpu_intdot.c go in both.
_FLAVOURS = {
    "avx512": (["cpu_gemv.c", "cpu_attention.c", "cpu_decode.c"], ["-mavx512f", "-mavx512bw", "-mavx512vl"]),
    "avx2": (["cpu_avx2.c"], ["-mavx2", "-mfma", "-mf16c"]),
}
_SHARED_SRCS = ["cpu_rope.c", "cpu_layer.c", "cpu_int4.c", "cpu_intdot.c"]
_HEADERS = ["cpu_common.h"]
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 8
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_GEMV = [_P] * 4 + [_I] * 3 + [ctypes.c_int]
# name: argument types (every function returns an int status; 0 = done). A library has a subset of these.
_SIGNATURES = {
    "gemv_bf16": _GEMV, "gemv_i8": _GEMV,
    "gemv_bf16_dp": _GEMV + [_P, ctypes.c_int], "gemv_i8_dp": _GEMV + [_P, ctypes.c_int],  # + bias, bf16 output
    "decode_attention": [_P] * 5 + [_I] * 13 + [_F, ctypes.c_int],
    "prefill_attention": [_P] * 4 + [_I] * 15 + [_F, ctypes.c_int],
    "rms_norm": [_P] * 3 + [_I] * 2 + [_F, ctypes.c_int],
    "rope_bf16": [_P] * 4 + [_I] * 3 + [ctypes.c_int],
    "bias_quick_gelu": [_P, _P, _I, _I, ctypes.c_int],
    "silu_mul": [_P, _P, _I, ctypes.c_int],
    "decode_layers": [_P, _I] + [_P] * 5 + [_I] + [_P] * 3 + [_I] * 6 + [_F] * 2 + [ctypes.c_int] + [_P, _P, _I,
                                                                                                  ctypes.c_int],
    "vision_attention": [_P] * 4 + [_I] * 3 + [_F, ctypes.c_int, ctypes.c_int, _I, _I],
    "gemv_q4_avx512bf16": [_P] * 5 + [_I] * 4 + [ctypes.c_int], "gemv_q4_avx2": [_P] * 5 + [_I] * 4 + [ctypes.c_int],
    "dequant_q4_bf16": [_P] * 4 + [_I] * 3 + [ctypes.c_int] * 2,
    "gemv_i8_intdot": [_P] * 4 + [_I] * 3 + [ctypes.c_int] * 2,
    "gemv_q4_intdot": [_P] * 5 + [_I] * 4 + [ctypes.c_int] * 2,
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags, read once (the int8 / int4 decode paths ask per call: reading the file
    cost ~0.4 ms each time, tens of ms per decoded token)."""
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
    flags = _cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if os.environ.get("QWEN2VL_KERNEL_ISA", "") == "avx2":
        return "avx2" if avx2 else None
    return "avx512" if avx512 else "avx2" if avx2 else None


def has_avx512bf16() -> bool:
    """AVX512-BF16 dot products (Zen 4+, Cooper Lake / Sapphire Rapids+) in the library this CPU runs."""
    return flavour() == "avx512" and "avx512_bf16" in _cpu_flags()


def has_bf16_gemv() -> bool:
    """Whether the library has the bf16-activation kernels (`*_dp`, decode attention, the fused decoding step):
    the AVX512 build on an AVX512-BF16 CPU, or the AVX2 build."""
    return library() is not None and (flavour() == "avx2" or has_avx512bf16())


@functools.cache
def has_native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates a bf16 matmul,
    and an fp32 one on widened operands is several times faster (measured on a 2-core Zen 3: 21 vs 160 GFLOP/s)."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags()) or platform.machine() not in ("x86_64", "AMD64")


def kernel(name: str):
    """The library's function `name`, or None without the library or where its build lacks it."""
    lib = library()
    return getattr(lib, name, None) if lib is not None else None


def _cache_dir() -> Path:
    base = os.environ.get("QWEN2VL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2vl")
    return Path(base) / "kernels"


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    isa = flavour()
    if cc is None or isa is None:
        return None
    srcs, isa_flags = _FLAVOURS[isa]
    paths = [_DIR / n for n in srcs + _SHARED_SRCS]
    flags = _FLAGS + isa_flags
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in paths + [_DIR / n for n in _HEADERS])
                            + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_{isa}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *flags, "-o", str(out), *map(str, paths)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("qwen2vl: CPU kernels not built (%s); using torch matmuls", proc.stderr.strip()[:300])
                return None
            os.replace(out, target)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (built on first use)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("QWEN2VL_DISABLE_KERNELS", "0") not in ("", "0"):
                _lib = None
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # a broken toolchain must never break inference
                    log.warning("qwen2vl: CPU kernels unavailable (%s); using torch matmuls", exc)
                    _lib = None
            _tried = True
    return _lib


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _dot_products(name: str, x: torch.Tensor) -> bool:
    """Whether `name` runs on the bf16-activation kernels (`*_dp`): bf16 activations with K % 32 == 0, on an
    AVX512-BF16 CPU for every row count with bf16 weights and for 2+ rows with int8 weights, on the AVX2 build
    always (it has no other GEMV)."""
    if x.dtype != torch.bfloat16 or x.shape[-1] % 32 or not has_bf16_gemv():
        return False
    return _rows(x) > 1 or name == "gemv_bf16" or flavour() == "avx2"


def _usable(name: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    rows = _rows(x)
    if not 0 < rows <= MAX_ROWS or x.shape[-1] % 16 != 0 or not weight.is_contiguous():
        return False
    if not _dot_products(name, x):
        if flavour() != "avx512":  # the fp32-activation kernels are in the AVX512 build only
            return False
        if rows > 4:  # without BF16 dot products the fp32 kernel only beats torch for a single row or a few
            return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return library() is not None


def _call(name: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """y (rows, N) = x @ W.T (* scale), no bias. gemv_bf16 on the dot-product path returns bf16, everything else
    fp32. (`_decode_gemv` is the bf16 path with the bias fused.)"""
    k = x.shape[-1]
    rows = _rows(x)
    if _dot_products(name, x):
        xin = x.reshape(-1, k).contiguous()   # bf16 activations, BF16 dot products
        bf16_out = name == "gemv_bf16"
        out = torch.empty(rows, weight.shape[0], dtype=torch.bfloat16 if bf16_out else torch.float32)
        extra = (None, int(bf16_out))
        name += "_dp"
    else:
        xin = x.reshape(-1, k).to(torch.float32).contiguous()
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        extra = ()
    rc = getattr(library(), name)(xin.data_ptr(), weight.data_ptr(),
                                  None if scale is None else scale.data_ptr(), out.data_ptr(),
                                  rows, weight.shape[0], k, torch.get_num_threads(), *extra)
    if rc != 0:
        raise RuntimeError(f"{name} failed with code {rc}")
    return out


@functools.cache
def _dp_gemv():
    """lib.gemv_bf16_dp, or None without the library or its bf16-activation kernels (resolved once)."""
    return library().gemv_bf16_dp if has_bf16_gemv() else None


def _decode_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The decoding case of `linear` with the fewest Python steps (a decode step makes ~200 of these calls):
    bf16 x of 1..MAX_ROWS rows on an AVX512-BF16 CPU, contiguous bf16 weight and bias, no autograd; bias added
    and bf16 written in the kernel's epilogue. None when any condition fails."""
    if x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16 or x.device.type != "cpu":
        return None
    fn = _dp_gemv()
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (fn is None or not 0 < rows <= MAX_ROWS or k % 32 or weight.device.type != "cpu"
            or not weight.is_contiguous() or weight.shape[1] != k):
        return None
    if bias is not None and (bias.dtype is not torch.bfloat16 or not bias.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    xin = x.reshape(rows, k)
    if not xin.is_contiguous():
        xin = xin.contiguous()
    n = weight.shape[0]
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    if fn(xin.data_ptr(), weight.data_ptr(), None, out.data_ptr(), rows, n, k, torch.get_num_threads(),
          None if bias is None else bias.data_ptr(), 1) != 0:
        return None
    return out.view(*x.shape[:-1], n)


# Where fp32 products of widened bf16 operands overtake the GEMV kernel in 8-row chunks (2-core Zen 3, a
# 1536 x 8960 weight: 32 rows 14.8 vs 10.5 ms, 64 rows 19.7 vs 20.7 ms, 256 rows 51 vs 84 ms).
WIDEN_MIN_ROWS = 64
WIDEN_TILE = 1 << 24  # weight elements widened at a time: at most 64 MB of fp32 scratch per thread
_widen_scratch = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """This thread's reusable fp32 buffer of at least `numel` elements. A fresh 55 MB tensor per call costs ~8x
    the widening itself (its pages are faulted in and zeroed on every call)."""
    buf = getattr(_widen_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: one made under inference_mode cannot be written outside
            buf = _widen_scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear for bf16 x (..., K) of many rows on a CPU without native bf16 matmuls, as an fp32 product of the
    widened operands rounded once to bf16: what a bf16 matmul computes (exact products, fp32 sums, one rounding),
    at fp32 matmul speed. The weight (N, K) is widened WIDEN_TILE elements at a time into a reused buffer. None
    where it does not apply (few rows, other dtypes or devices, autograd, a CPU with bf16 matmuls)."""
    if x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16 or x.device.type != "cpu":
        return None
    if x.numel() < WIDEN_MIN_ROWS * x.shape[-1] or has_native_bf16_matmul() or weight.dim() != 2:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return None
    return _widened(x, weight, bias)


def _widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """widened_linear's product, unchecked (also a candidate the chooser times on CPUs with native bf16)."""
    n, k = weight.shape
    xf = x.reshape(-1, k).float()
    bf = None if bias is None else bias.float()
    tile = max(1, WIDEN_TILE // max(k, 1))
    if n <= tile:
        y = F.linear(xf, _scratch(n * k).view(n, k).copy_(weight), bf)
    else:
        y = torch.empty(xf.shape[0], n, dtype=torch.float32)
        for n0 in range(0, n, tile):
            n1 = min(n, n0 + tile)
            w = _scratch((n1 - n0) * k).view(n1 - n0, k).copy_(weight[n0:n1])
            y[:, n0:n1] = F.linear(xf, w, None if bf is None else bf[n0:n1])
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)


def _chunked_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """bf16 x of MAX_ROWS+1 .. WIDEN_MIN_ROWS-1 rows (a short prompt's prefill) on a CPU without native bf16
    matmuls: the GEMV kernel over 8-row chunks (each reads the weight once), 2-4x faster there than fp32 on
    widened operands and ~4x torch's emulated bf16. None where it does not apply."""
    k = x.shape[-1]
    rows = _rows(x)
    if not MAX_ROWS < rows < WIDEN_MIN_ROWS or has_native_bf16_matmul():
        return None
    return _gemv_chunks(x, weight, bias)


def _gemv_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """_chunked_gemv's product for any row count (a candidate the chooser times), or None without the kernel."""
    k = x.shape[-1]
    rows = _rows(x)
    if not has_bf16_gemv():
        return None
    x2 = x.reshape(rows, k)
    parts = []
    for i in range(0, rows, MAX_ROWS):
        y = _decode_gemv(x2[i:i + MAX_ROWS], weight, bias)
        if y is None:
            return None
        parts.append(y)
    return torch.cat(parts).view(*x.shape[:-1], weight.shape[0])


def linear_choice(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """What `choose` picked for bf16 x of `rows` rows times this weight (decode_gemv / lm_head / prefill_linear),
    None for today's rule. The caller has checked: CPU, bf16 activations and weight, no autograd."""
    n, k = weight.shape
    op = choose.linear_op(rows, n)
    rep = choose.rows_class(op, rows)
    return choose.decide(op, (rep, n, k, int(bias is not None)), lambda: _linear_trial(rep, weight, bias),
                         timed=n * k >= choose.MIN_WEIGHT and weight.is_contiguous())


def _linear_trial(rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> choose.Trial:
    """Candidates of a text linear on random activations of `rows` rows and the real weight; the reference is
    fp32 on the first rows and columns (a vocabulary-sized weight widened whole would take ~1 GB)."""
    x = torch.randn(rows, weight.shape[1], dtype=torch.bfloat16)
    r, c = min(rows, 8), min(weight.shape[0], 1024)
    b = None if bias is None else bias[:c].float()
    cands = {"torch": lambda: F.linear(x, weight, bias)}
    if rows <= MAX_ROWS:
        if _decode_gemv(x, weight, bias) is not None or _usable("gemv_bf16", x, weight):
            cands["kernel"] = lambda: _linear_today(x, weight, bias)
    elif not has_native_bf16_matmul():  # with native bf16 products neither beats one (a 2x-9x loss on Zen 4)
        cands["widened"] = lambda: _widened(x, weight, bias)
        if rows < WIDEN_MIN_ROWS:
            cands["chunked"] = lambda: _gemv_chunks(x, weight, bias)
    today = "kernel" if rows <= MAX_ROWS else "torch" if has_native_bf16_matmul() else \
        "chunked" if rows < WIDEN_MIN_ROWS else "widened"
    return choose.Trial(cands, lambda: F.linear(x[:r].float(), weight[:c].float(), b), lambda y: y[:r, :c].float(),
                        (today, "torch"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, the bf16 case on the candidate `choose` picked for its shape (today's rule: the few-rows case on
    the CPU kernel). x (..., K), weight (N, K)."""
    if (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.device.type == "cpu" and weight.dim() == 2
            and x.shape[-1] and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        route = linear_choice(_rows(x), weight, bias)
        if route == "torch":
            return F.linear(x, weight, bias)
        y = _widened(x, weight, bias) if route == "widened" else \
            _gemv_chunks(x, weight, bias) if route == "chunked" and _rows(x) > MAX_ROWS else None
        if y is not None:
            return y
    return _linear_today(x, weight, bias)


def _linear_today(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Today's rule for `linear`: the bf16 few-rows case on the CPU kernel, 9-63 rows in 8-row chunks and 64+ on
    widened operands where bf16 is emulated, else F.linear."""
    y = _decode_gemv(x, weight, bias)
    if y is None:
        y = _chunked_gemv(x, weight, bias)
    if y is not None:
        return y
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and _usable("gemv_bf16", x, weight):
        # No BF16 dot products, K % 32 != 0 or a bias that cannot be fused: the bias is added here.
        y = _call("gemv_bf16", x, weight, None)
        if bias is not None:
            y += bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    y = widened_linear(x, weight, bias)
    return y if y is not None else F.linear(x, weight, bias)


def linear_int8(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) @ (weight_int8 * scales[:, None]).T with the CPU kernel, or None when it cannot run."""
    # On AVX512 widening int8 costs more than it saves beyond 4 rows; on AVX2 it costs what bf16 widening does.
    if (_rows(x) > 4 and flavour() != "avx2") or not _usable("gemv_i8", x, weight_int8):
        return None
    y = _call("gemv_i8", x, weight_int8, scales.float().contiguous())
    return y.to(x.dtype).view(*x.shape[:-1], weight_int8.shape[0])


class Linear(torch.nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose inference forward uses the decode kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def __getattr__(name: str):
    """`PrepackedLinear` (the vision tower's linear) lives in prepacked.py; this name stays importable."""
    if name == "PrepackedLinear":
        from .prepacked import PrepackedLinear

        return PrepackedLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
