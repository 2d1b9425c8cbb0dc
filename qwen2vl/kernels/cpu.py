"""CPU kernels via a small C library: building it, and the bf16 / int8 weight GEMV for the few-rows case
(decoding) behind `linear` / `Linear`. The attention and elementwise kernels' wrappers are in `cpu_ops.py`.

PyTorch's bf16 matmul with 1-8 activation rows reads weights at a fraction of memory bandwidth on CPUs without
AMX (measured here: 3-5 GB/s vs ~20 GB/s), and decoding is nothing but such matmuls. `cpu_gemv.c` is compiled
once with the system C compiler into a per-user cache and called through ctypes (no torch headers, ~1 s
build). Anything it cannot do (no AVX512F, no compiler, autograd, odd shapes, > 8 rows) falls back to torch.
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

log = logging.getLogger(__name__)
_SRCS = [Path(__file__).with_name(n) for n in ("cpu_gemv.c", "cpu_attention.c", "cpu_decode.c", "cpu_layer.c")]
_HEADERS = [Path(__file__).with_name("cpu_common.h")]
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-shared", "-fPIC"]
MAX_ROWS = 8
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_has_avx512f() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags


_HAS_BF16: bool | None = None


def has_avx512bf16() -> bool:
    """AVX512-BF16 dot products (Zen 4+, Cooper Lake / Sapphire Rapids+)."""
    global _HAS_BF16
    if _HAS_BF16 is None:
        try:
            _HAS_BF16 = _cpu_has_avx512f() and " avx512_bf16" in Path("/proc/cpuinfo").read_text()
        except OSError:
            _HAS_BF16 = False
    return _HAS_BF16


def _cache_dir() -> Path:
    base = os.environ.get("QWEN2VL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2vl")
    return Path(base) / "kernels"


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or not _cpu_has_avx512f():
        return None
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SRCS + _HEADERS) + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_gemv-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *_FLAGS, "-o", str(out), *map(str, _SRCS)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("qwen2vl: CPU kernels not built (%s); using torch matmuls", proc.stderr.strip()[:300])
                return None
            os.replace(out, target)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(target))
    for name in ("gemv_bf16", "gemv_i8", "gemv_bf16_dp", "gemv_i8_dp"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        if name.endswith("_dp"):  # + bf16 bias (or NULL) and bf16 output flag
            fn.argtypes += [ctypes.c_void_p, ctypes.c_int]
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 13 + [ctypes.c_float, ctypes.c_int])
    lib.prefill_attention.restype = ctypes.c_int
    lib.prefill_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 15 + [ctypes.c_float, ctypes.c_int])
    lib.rms_norm.restype = ctypes.c_int
    lib.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.rope_bf16.restype = ctypes.c_int
    lib.rope_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.bias_quick_gelu.restype = ctypes.c_int
    lib.bias_quick_gelu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.silu_mul.restype = ctypes.c_int
    lib.silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.decode_layers.restype = ctypes.c_int
    lib.decode_layers.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] +
                                  [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_float] * 2 + [ctypes.c_int])
    lib.vision_attention.restype = ctypes.c_int
    lib.vision_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 +
                                     [ctypes.c_float, ctypes.c_int, ctypes.c_int])
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


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    rows = _rows(x)
    if not 0 < rows <= MAX_ROWS or x.shape[-1] % 16 != 0 or not weight.is_contiguous():
        return False
    if rows > 1 and not (x.dtype == torch.bfloat16 and x.shape[-1] % 32 == 0 and has_avx512bf16()):
        # Without BF16 dot products the fp32 kernel only beats torch for a single row or a few.
        if rows > 4:
            return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return library() is not None


def _dot_products(name: str, x: torch.Tensor) -> bool:
    """Whether `name` runs on the BF16-dot-product kernels: bf16 activations with K % 32 == 0 on an AVX512-BF16
    CPU, for every row count with bf16 weights and for 2+ rows with int8 weights."""
    return ((_rows(x) > 1 or name == "gemv_bf16") and x.dtype == torch.bfloat16 and x.shape[-1] % 32 == 0
            and has_avx512bf16())


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
    """lib.gemv_bf16_dp, or None without the library or AVX512-BF16 (resolved once)."""
    lib = library()
    return lib.gemv_bf16_dp if lib is not None and has_avx512bf16() else None


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the bf16 few-rows case on the CPU kernel. x (..., K), weight (N, K)."""
    y = _decode_gemv(x, weight, bias)
    if y is not None:
        return y
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and _usable(x, weight):
        # No BF16 dot products, K % 32 != 0 or a bias that cannot be fused: the bias is added here.
        y = _call("gemv_bf16", x, weight, None)
        if bias is not None:
            y += bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_int8(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) @ (weight_int8 * scales[:, None]).T with the CPU kernel, or None when it cannot run."""
    if _rows(x) > 4 or not _usable(x, weight_int8):  # int8 widening costs more than it saves beyond 4 rows
        return None
    y = _call("gemv_i8", x, weight_int8, scales.float().contiguous())
    return y.to(x.dtype).view(*x.shape[:-1], weight_int8.shape[0])


class Linear(torch.nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose inference forward uses the decode kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


PREPACK_MIN_ROWS = 64
_PREPACK_OK = os.environ.get("QWEN2VL_DISABLE_PREPACK", "0") in ("", "0")


class PrepackedLinear(torch.nn.Linear):
    """nn.Linear (same parameters and state-dict keys) for layers that always see many rows (the vision tower):
    bf16 inference on CPU multiplies by oneDNN's prepacked (blocked) copy of the weight, made on first use and
    rebuilt when the weight changes; 10-15 % faster than F.linear, which re-blocks the weight on every call, and
    bit-identical. Costs one extra copy of these weights in memory (QWEN2VL_DISABLE_PREPACK=1 turns it off)."""

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if not _PREPACK_OK or x.device.type != "cpu" or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
            return None
        if x.dim() != 2 or x.shape[0] < PREPACK_MIN_ROWS or (torch.is_grad_enabled() and
                                                            (x.requires_grad or w.requires_grad)):
            return None
        try:
            version = w._version
        except RuntimeError:  # inference tensors (created under inference_mode) have no version counter
            version = -1
        key = (w.data_ptr(), version, tuple(w.shape))
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            except (RuntimeError, AttributeError):  # no oneDNN in this torch build
                packed = None
            cached = self.__dict__["_packed"] = (key, packed)
        return cached[1]

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        bias = self.bias if with_bias else None
        packed = self.packed_weight(x)
        if packed is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
