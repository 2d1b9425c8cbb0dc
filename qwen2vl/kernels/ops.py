"""The C kernels as `torch.library` ops with schemas (namespace `qwen2vl`): the only place that calls the library.

Each op's schema fixes its arguments (a call with a wrong count or type raises in the dispatcher instead of
reaching C), its CPU implementation checks the shapes the C function assumes (ValueError naming the problem) and
calls it, and its fake implementation gives `torch.compile` the output's shape without running it, so compiled
graphs keep the kernels without wrappers. `C_FUNCTIONS` is the ctypes side of every exported C function
(in build.py; tests/test_kernel_ops.py parses `qwen2vl_kernels.h` and compares), and `call` refuses a call whose
argument count differs (ctypes itself passes extra arguments on silently).

Which op runs for a given call (kernel or PyTorch) is decided by `backend.py` and the per-op checks in `cpu.py` /
`cpu_ops.py`; these ops assume their preconditions hold. Ops (torch.ops.qwen2vl.*):

    linear(x, weight, bias)                      F.linear; bf16 on the route `choose` picked (cpu.linear)
    gemv(x, weight, scale, bias, bf16_out)       x (M<=8, K) bf16 / fp32, weight (N, K) bf16 / int8 -> (M, N)
    gemv_int4(x, qweight, scales, zeros, group)  x (M<=8, K) bf16 -> (M, N) bf16
    dequant_int4_(out, qweight, scales, zeros, group, use512)   out (N, K) bf16 written
    rms_norm(x, weight, eps)  rope(x, cos, sin, head_dim)  silu_mul_(gate, up)  bias_quick_gelu_(x, bias)
    decode_attention(q, k, v, mask, scale)  prefill_attention(q, k, v, scale)
    vision_attention_(out, qkv, cos, sin, num_heads, scale, seg_start, seg_end, q0, q1, h0, h1)
    gemv_int4_intdot(x, qweight, scales, zeros, group, use512)   gemv_int8_intdot(x, weight, scales, use512)
    decode_layers_(x, weights, keys, values, slots, kv_len, mask, cos, sin, num_heads, eps, scale, kinds, qparams,
                   group, use512)
"""
from __future__ import annotations

import ctypes

import torch

from . import build
from .build import C_FUNCTIONS

MAX_ROWS = 8  # activation rows of the GEMV kernels

def call(name: str, *args) -> int:
    """The library's `name` with exactly its declared arguments (TypeError otherwise); returns its status."""
    fn = getattr(build.library(), name)
    if len(args) != len(C_FUNCTIONS[name]):
        raise TypeError(f"{name} takes {len(C_FUNCTIONS[name])} arguments, got {len(args)}")
    return fn(*args)


def _need(ok: bool, op: str, what: str) -> None:
    if not ok:
        raise ValueError(f"qwen2vl::{op}: {what}")


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise RuntimeError(f"qwen2vl::{op} kernel failed with code {rc}")


_lib = torch.library.Library("qwen2vl", "FRAGMENT")
_SCHEMAS = {
    "linear": "linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "gemv": "gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, bool bf16_out) -> Tensor",
    "gemv_int4": "gemv_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor",
    "dequant_int4_": "dequant_int4_(Tensor(a!) out, Tensor qweight, Tensor scales, Tensor zeros, int group_size, "
                     "bool use512) -> ()",
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "rope": "rope(Tensor x, Tensor cos, Tensor sin, int head_dim) -> Tensor",
    "silu_mul_": "silu_mul_(Tensor(a!) gate, Tensor up) -> ()",
    "bias_quick_gelu_": "bias_quick_gelu_(Tensor(a!) x, Tensor bias) -> ()",
    "decode_attention": "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
    "prefill_attention": "prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor",
    "vision_attention_": "vision_attention_(Tensor(a!) out, Tensor qkv, Tensor cos, Tensor sin, int num_heads, "
                         "float scale, int seg_start, int seg_end, int q0, int q1, int h0, int h1) -> ()",
    "decode_layers_": "decode_layers_(Tensor(a!) x, Tensor[] weights, Tensor(b!)[] keys, Tensor(c!)[] values, "
                      "int[] slots, int kv_len, Tensor? mask, Tensor cos, Tensor sin, int num_heads, float eps, "
                      "float scale, int[] kinds, Tensor?[] qparams, int group, int use512) -> ()",
    "gemv_int4_intdot": "gemv_int4_intdot(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, "
                        "int use512) -> Tensor",
    "gemv_int8_intdot": "gemv_int8_intdot(Tensor x, Tensor weight, Tensor scales, int use512) -> Tensor",
}
for _schema in _SCHEMAS.values():
    _lib.define(_schema)


def _impl(name: str):
    def register(fn):
        _lib.impl(name, fn, "CPU")
        return fn
    return register


def _fake(name: str):
    def register(fn):
        torch.library.register_fake(f"qwen2vl::{name}", fn, lib=_lib)
        return fn
    return register


def _mutates_only(*args) -> None:  # fake of the ops that only write into their (a!) arguments
    return None


for _name in ("silu_mul_", "bias_quick_gelu_", "dequant_int4_", "vision_attention_", "decode_layers_"):
    torch.library.register_fake(f"qwen2vl::{_name}", _mutates_only, lib=_lib)


def implement(name: str, fn) -> None:
    """Register `fn` as the CPU implementation of op `name` (for ops implemented outside this file: `linear`, the
    chooser's route between the GEMV kernel and torch, lives in cpu.py)."""
    _lib.impl(name, fn, "CPU")


@_fake("linear")
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


@_impl("gemv")
def _gemv(x, weight, scale, bias, bf16_out):
    m, k = x.shape
    n = weight.shape[0]
    _need(x.dim() == 2 and 0 < m <= MAX_ROWS and x.is_contiguous(), "gemv", f"x must be contiguous (1..8, K), "
          f"got {tuple(x.shape)}")
    _need(weight.shape == (n, k) and weight.is_contiguous() and weight.dtype in (torch.bfloat16, torch.int8),
          "gemv", f"weight must be contiguous bf16 / int8 ({n}, {k}), got {weight.dtype} {tuple(weight.shape)}")
    _need(scale is None or (scale.dtype is torch.float32 and scale.shape == (n,) and scale.is_contiguous()),
          "gemv", "scale must be contiguous fp32 (N,)")
    wname = "gemv_bf16" if weight.dtype is torch.bfloat16 else "gemv_i8"
    if x.dtype is torch.bfloat16:  # BF16 dot products, bias and bf16 output in the epilogue
        _need(k % 32 == 0, "gemv", f"bf16 activations need K % 32 == 0, got {k}")
        _need(bias is None or (bias.dtype is torch.bfloat16 and bias.shape == (n,) and bias.is_contiguous()),
              "gemv", "bias must be contiguous bf16 (N,)")
        out = torch.empty(m, n, dtype=torch.bfloat16 if bf16_out else torch.float32)
        rc = call(wname + "_dp", x.data_ptr(), weight.data_ptr(), _ptr(scale), out.data_ptr(), m, n, k,
                  torch.get_num_threads(), _ptr(bias), int(bf16_out))
    else:
        _need(x.dtype is torch.float32 and k % 16 == 0 and bias is None and not bf16_out, "gemv",
              "fp32 activations need K % 16 == 0, no bias, fp32 output")
        out = torch.empty(m, n, dtype=torch.float32)
        rc = call(wname, x.data_ptr(), weight.data_ptr(), _ptr(scale), out.data_ptr(), m, n, k,
                  torch.get_num_threads())
    _check(rc, "gemv")
    return out


@_fake("gemv")
def _(x, weight, scale, bias, bf16_out):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16 if bf16_out else torch.float32)


def int4_function() -> str | None:
    """The 4-bit GEMV this CPU runs (AVX512-BF16 dot products, or the AVX2 build's fp32 FMA one), or None."""
    if build.flavour() == "avx2":
        return "gemv_q4_avx2" if build.kernel("gemv_q4_avx2") is not None else None
    return "gemv_q4_avx512bf16" if build.has_avx512bf16() and build.kernel("gemv_q4_avx512bf16") else None


@_impl("gemv_int4")
def _gemv_int4(x, qweight, scales, zeros, group_size):
    m, k = x.shape
    n = qweight.shape[0]
    name = int4_function()
    _need(name is not None, "gemv_int4", "no 4-bit GEMV for this CPU")
    _need(x.dtype is torch.bfloat16 and x.is_contiguous() and 0 < m <= MAX_ROWS and k % 128 == 0
          and group_size % 128 == 0 and qweight.shape[1] * 2 == k, "gemv_int4",
          f"x must be contiguous bf16 (1..8, K % 128 == 0) matching qweight {tuple(qweight.shape)}")
    out = torch.empty(m, n, dtype=torch.bfloat16)
    _check(call(name, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), m, n, k,
                group_size, torch.get_num_threads()), "gemv_int4")
    return out




@_impl("dequant_int4_")
def _dequant_int4(out, qweight, scales, zeros, group_size, use512):
    n, k = out.shape
    _need(out.dtype is torch.bfloat16 and out.is_contiguous() and qweight.shape == (n, k // 2)
          and all(t.is_contiguous() for t in (qweight, scales, zeros)), "dequant_int4_",
          f"out (N, K) bf16 and contiguous packed rows (N, K/2), got {tuple(out.shape)}, {tuple(qweight.shape)}")
    _check(call("dequant_q4_bf16", qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), n, k,
                group_size, torch.get_num_threads(), int(use512)), "dequant_int4_")


def _bf16_contiguous(op: str, **tensors) -> None:
    for name, t in tensors.items():
        _need(t.dtype is torch.bfloat16 and t.is_contiguous(), op, f"{name} must be contiguous bf16")


@_impl("rms_norm")
def _rms_norm(x, weight, eps):
    n = x.shape[-1]
    _bf16_contiguous("rms_norm", x=x, weight=weight)
    _need(weight.shape == (n,), "rms_norm", f"weight must be ({n},), got {tuple(weight.shape)}")
    out = torch.empty_like(x)
    _check(call("rms_norm", x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, ctypes.c_float(eps),
                torch.get_num_threads()), "rms_norm")
    return out


@_fake("rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x)


@_impl("rope")
def _rope(x, cos, sin, head_dim):
    _bf16_contiguous("rope", x=x, cos=cos, sin=sin)
    _need(x.dim() == 3 and cos.shape == (*x.shape[:2], head_dim) and sin.shape == cos.shape
          and x.shape[-1] % head_dim == 0, "rope", f"x (B,S,H*D) with cos/sin (B,S,D={head_dim}), got "
          f"{tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    out = torch.empty_like(x)
    _check(call("rope_bf16", x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), x.shape[0] * x.shape[1],
                x.shape[-1] // head_dim, head_dim, torch.get_num_threads()), "rope")
    return out


@_fake("rope")
def _(x, cos, sin, head_dim):
    return torch.empty_like(x)


@_impl("silu_mul_")
def _silu_mul(gate, up):
    _bf16_contiguous("silu_mul_", gate=gate, up=up)
    _need(gate.shape == up.shape and gate.numel() % 16 == 0, "silu_mul_", "gate and up of one shape, numel % 16")
    _check(call("silu_mul", gate.data_ptr(), up.data_ptr(), gate.numel(), torch.get_num_threads()), "silu_mul_")


@_impl("bias_quick_gelu_")
def _bias_quick_gelu(x, bias):
    _bf16_contiguous("bias_quick_gelu_", x=x)
    _need(x.dim() == 2 and x.shape[1] % 16 == 0 and bias.dtype is torch.float32 and bias.shape == (x.shape[1],)
          and bias.is_contiguous(), "bias_quick_gelu_", "x (rows, N % 16) bf16 and an fp32 bias (N,)")
    _check(call("bias_quick_gelu", x.data_ptr(), bias.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads()),
           "bias_quick_gelu_")


def _attention_inputs(op: str, q, k, v) -> None:
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    _need(q.dtype is k.dtype is v.dtype is torch.bfloat16 and q.dim() == k.dim() == v.dim() == 4, op,
          "q, k, v must be 4-D bf16")
    _need(d % 16 == 0 and d <= 128 and hq % hkv == 0 and all(t.stride(-1) == 1 for t in (q, k, v))
          and k.shape == v.shape and k.shape[-1] == d, op,
          f"head_dim % 16 == 0 and <= 128, Hq a multiple of Hkv, D contiguous; got q {tuple(q.shape)}, "
          f"k {tuple(k.shape)}, v {tuple(v.shape)}")


@_impl("decode_attention")
def _decode_attention(q, k, v, mask, scale):
    b, hq, s, d = q.shape
    _attention_inputs("decode_attention", q, k, v)
    hkv, klen = k.shape[1], k.shape[2]
    _need(s == 1 and klen > 0 and k.shape[0] == b, "decode_attention", "one query per row over K > 0 keys")
    _need(mask is None or (mask.dtype is torch.uint8 and mask.shape == (b, klen) and mask.is_contiguous()),
          "decode_attention", f"mask must be contiguous uint8 ({b}, {klen})")
    out = torch.empty(b, hq, 1, d, dtype=torch.bfloat16)
    _check(call("decode_attention", q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(mask), out.data_ptr(), b, hq, hkv,
                klen, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                v.stride(2), ctypes.c_float(scale), torch.get_num_threads()), "decode_attention")
    return out


@_fake("decode_attention")
def _(q, k, v, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_impl("prefill_attention")
def _prefill_attention(q, k, v, scale):
    b, hq, s, d = q.shape
    _attention_inputs("prefill_attention", q, k, v)
    hkv, klen = k.shape[1], k.shape[2]
    _need(0 < s <= klen and k.shape[0] == b, "prefill_attention", f"S={s} queries over K >= S keys, got K={klen}")
    out = torch.empty(b, s, hq, d, dtype=torch.bfloat16)
    _check(call("prefill_attention", q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, hq, hkv, s, klen,
                d, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                v.stride(1), v.stride(2), ctypes.c_float(scale), torch.get_num_threads()), "prefill_attention")
    return out.transpose(1, 2)  # (B, Hq, S, D) view of a (B, S, Hq, D) buffer: o_proj needs no copy


@_fake("prefill_attention")
def _(q, k, v, scale):
    b, hq, s, d = q.shape
    return q.new_empty(b, s, hq, d).transpose(1, 2)


@_impl("vision_attention_")
def _vision_attention(out, qkv, cos, sin, num_heads, scale, seg_start, seg_end, q0, q1, h0, h1):
    d = qkv.shape[1] // (3 * num_heads)
    _need(qkv.dtype in (torch.float32, torch.bfloat16) and d % 16 == 0 and d <= 128 and out.dtype is qkv.dtype,
          "vision_attention_", f"qkv (N, 3*H*D) fp32 / bf16 with D % 16 == 0 and <= 128, got {tuple(qkv.shape)}")
    _need(all(t.is_contiguous() for t in (qkv, cos, sin, out)) and cos.dtype is sin.dtype is torch.float32,
          "vision_attention_", "contiguous qkv / out and fp32 cos / sin")
    _need(0 <= seg_start <= q0 < q1 <= seg_end <= qkv.shape[0], "vision_attention_",
          f"queries [{q0}, {q1}) must lie in the segment [{seg_start}, {seg_end})")
    _need(0 <= h0 < h1 <= num_heads, "vision_attention_", f"heads [{h0}, {h1}) must lie in [0, {num_heads})")
    a = seg_start
    row_q, row_o = qkv.shape[1] * qkv.element_size(), out.shape[1] * out.element_size()
    _check(call("vision_attention", qkv.data_ptr() + a * row_q, cos.data_ptr() + a * d * 4, sin.data_ptr() + a * d * 4,
                out.data_ptr() + a * row_o, seg_end - a, num_heads, d, ctypes.c_float(scale),
                int(qkv.dtype is torch.bfloat16), torch.get_num_threads(), q0 - a, q1 - a, h0, h1), "vision_attention_")


# weights of one decoder layer, in the order cpu_layer.c reads them
DECODE_LAYER_WEIGHTS = ("ln1", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "ln2", "wg", "wu", "wd")
# quantized projections (cpu_layer.c's P_* kinds): the exact 4-bit kernel, the integer-dot-product 4-bit / int8 ones
DECODE_KINDS = {"bf16": 0, "int4": 1, "int4_intdot": 2, "int8_intdot": 3}
_PROJ_AT = (1, 3, 5, 7, 9, 10, 11)  # where q k v o gate up down sit in DECODE_LAYER_WEIGHTS


@_impl("gemv_int4_intdot")
def _gemv_int4_intdot(x, qweight, scales, zeros, group_size, use512):
    m, k = x.shape
    n = qweight.shape[0]
    _need(x.dtype is torch.bfloat16 and x.is_contiguous() and 0 < m <= MAX_ROWS and k % 128 == 0
          and group_size % 128 == 0 and k % group_size == 0 and qweight.shape == (n, k // 2)
          and qweight.dtype is torch.uint8 and qweight.is_contiguous(), "gemv_int4_intdot",
          f"x (1..8, K) bf16 with K % 128 == 0 and qweight (N, K/2) uint8, got {tuple(x.shape)} {tuple(qweight.shape)}")
    out = torch.empty(m, n, dtype=torch.bfloat16)
    _check(call("gemv_q4_intdot", x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                out.data_ptr(), m, n, k, group_size, torch.get_num_threads(), use512), "gemv_int4_intdot")
    return out


@_impl("gemv_int8_intdot")
def _gemv_int8_intdot(x, weight, scales, use512):
    m, k = x.shape
    n = weight.shape[0]
    _need(x.dtype is torch.bfloat16 and x.is_contiguous() and 0 < m <= MAX_ROWS and weight.shape == (n, k)
          and weight.dtype is torch.int8 and weight.is_contiguous() and scales.dtype is torch.float32
          and scales.shape == (n,) and scales.is_contiguous(), "gemv_int8_intdot",
          f"x (1..8, K) bf16, weight (N, K) int8, scales (N,) fp32, got {tuple(x.shape)} {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=torch.bfloat16)
    _check(call("gemv_i8_intdot", x.data_ptr(), weight.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k,
                torch.get_num_threads(), use512), "gemv_int8_intdot")
    return out


for _name in ("gemv_int4", "gemv_int4_intdot", "gemv_int8_intdot"):  # (M, K) bf16 -> (M, N) bf16
    @_fake(_name)
    def _(x, weight, *rest):
        return x.new_empty(x.shape[0], weight.shape[0])


@_impl("decode_layers_")
def _decode_layers(x, weights, keys, values, slots, kv_len, mask, cos, sin, num_heads, eps, scale, kinds, qparams,
                   group, use512):
    layers, n = len(keys), len(DECODE_LAYER_WEIGHTS)
    _need(layers > 0 and len(values) == layers and len(weights) == layers * n, "decode_layers_",
          f"{n} weights per layer and one key / value tensor per layer")
    b, h = x.shape
    kc = keys[0]
    hkv, smax, d = kc.shape[1:]
    packed = bool(kinds) and kinds[6] in (DECODE_KINDS["int4"], DECODE_KINDS["int4_intdot"])  # 2 columns a byte
    qd, inter = num_heads * d, weights[n - 1].shape[1] * (2 if packed else 1)
    shapes = [(h,), (qd, h), (qd,), (hkv * d, h), (hkv * d,), (hkv * d, h), (hkv * d,), (h, qd), (h,), (inter, h),
              (inter, h), (h, inter)] * layers
    dtypes = [torch.bfloat16] * len(shapes)
    if kinds:  # quantized projections: L x 7 kinds; qparams 2 per projection (fp32 scales, uint8 zeros or None)
        _need(len(kinds) == layers * 7 and len(qparams) == 2 * len(kinds) and group > 0
              and not any(w % 128 or w % group for w in (h, qd, inter)), "decode_layers_",
              "7 kinds and 2 qparams per layer, widths multiples of 128 and of the group size")
        for i, kind in enumerate(kinds):
            if kind == DECODE_KINDS["bf16"]:
                continue
            at = (i // 7) * n + _PROJ_AT[i % 7]
            out, k = shapes[at]
            four = kind != DECODE_KINDS["int8_intdot"]
            shapes[at], dtypes[at] = ((out, k // 2), torch.uint8) if four else ((out, k), torch.int8)
            want = [(qparams[2 * i], (out, k // group) if four else (out,), torch.float32)] + \
                ([(qparams[2 * i + 1], (out, k // group), torch.uint8)] if four else [])
            _need(all(t is not None and t.shape == sh and t.dtype is dt and t.is_contiguous() for t, sh, dt in want),
                  "decode_layers_", f"scales / zeros of projection {i} in the quantized layout")
    _need(all(t.shape == s and t.dtype is dt and t.is_contiguous() and t.device.type == "cpu"
              for t, s, dt in zip(weights, shapes, dtypes)),
          "decode_layers_", "every weight contiguous (bf16, or its quantized format) of its layer's shape")
    _need(x.dtype is torch.bfloat16 and x.is_contiguous() and len(slots) == b == kc.shape[0]
          and 0 < kv_len <= smax and max(slots) < kv_len and cos.shape == sin.shape == (b, d)
          and cos.dtype is sin.dtype is torch.bfloat16 and cos.is_contiguous() and sin.is_contiguous()
          and (mask is None or (mask.dtype is torch.uint8 and mask.shape == (b, kv_len) and mask.is_contiguous())),
          "decode_layers_", "x (B, H) bf16, B slots below kv_len <= the cache's slots, cos / sin (B, D) bf16, "
          "mask (B, kv_len) uint8")
    _need(all(t.shape == kc.shape and t.stride() == kc.stride() and t.dtype is torch.bfloat16 and t.stride(-1) == 1
              and t.device.type == "cpu" for t in keys + values), "decode_layers_", "keys / values of one shape, strides and dtype")
    ptrs = (ctypes.c_void_p * (layers * n))(*[t.data_ptr() for t in weights])
    kp = (ctypes.c_void_p * layers)(*[t.data_ptr() for t in keys])
    vp = (ctypes.c_void_p * layers)(*[t.data_ptr() for t in values])
    strides = (ctypes.c_int64 * 6)(*kc.stride()[:3], *values[0].stride()[:3])
    qargs = (None, None, 0, 0)
    if kinds:
        qargs = ((ctypes.c_int32 * len(kinds))(*kinds), (ctypes.c_void_p * len(qparams))(*map(_ptr, qparams)),
                 group, use512)
    rc = call("decode_layers", x.data_ptr(), layers, ptrs, kp, vp, strides, (ctypes.c_int64 * b)(*slots), kv_len,
              _ptr(mask), cos.data_ptr(), sin.data_ptr(), b, h, inter, num_heads, hkv, d, eps, scale,
              torch.get_num_threads(), *qargs)
    # -1: a shape precondition of a kernel (nothing written: the caller checks them first); -3 out of memory;
    # -2 a kernel failed after x / the cache were written.
    _check(rc, "decode_layers_")
