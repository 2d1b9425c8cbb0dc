"""Group-wise 4-bit weight-only linear layers.

A weight W (out, in) is held as 4-bit codes q in 0..15 with one scale s and one integer zero point z per output
row and group of `group_size` consecutive input columns: W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)],
g(i) = i // group_size. Symmetric quantization is z = 8.

Layout (what the CPU kernel reads; `qweight` in the state dict): per output row, the input columns padded to a
multiple of 128 and packed 128 columns to 64 bytes, read as 32 little-endian 16-bit lanes: lane l holds columns
l, 32 + l, 64 + l and 96 + l in its nibbles 0..3 (low to high). One 64-byte load then gives four 32-lane vectors
of consecutive columns with a shift and one bit operation each (no widening, no shuffles across lanes).
`scales` is fp32 (out, n_groups), `zeros` uint8 (out, n_groups).

GPTQ act-order checkpoints (`g_idx`: group of each input column, not monotonic) are loaded by permuting the input
columns once so every group is contiguous (`input_perm`, a buffer saved with the layer) and gathering the same
columns of x at run time (one index_select of the activations, tiny next to the weight read).

Forward: 1-8 activation rows on the CPU run the 4-bit GEMV kernel (`kernels/cpu_int4.py`), where `choose`
picks it ("int4_gemv": kernel | torch | intdot, torch = torch's `_weight_int4pack_mm_for_cpu` on its own packed
copy, intdot = int8-quantized activations times the codes in integer dot products, `cpu_int4.linear_int4_intdot`);
anything else dequantizes the weight into the activation dtype a tile at a time (tiles.py) and calls
F.linear (oneDNN on CPU, AMX where present; cuBLAS on GPU), which is correct on every device by construction.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import choose
from ..kernels import cpu_int4
from .tiles import dequantized_matmul

BLOCK = 128              # input columns per packed block (64 bytes)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (out, in) in 0..15 -> the kernel layout (out, ceil(in / 128) * 64), padding columns are 0."""
    out, k = q.shape
    kp = -(-k // BLOCK) * BLOCK
    if kp != k:
        q = F.pad(q, (0, kp - k))
    b = q.reshape(out, kp // BLOCK, 4, BLOCK // 4)              # [.., nibble, lane]
    lo, hi = b[:, :, 0] | (b[:, :, 1] << 4), b[:, :, 2] | (b[:, :, 3] << 4)  # bytes 2l and 2l + 1 of lane l
    return torch.stack([lo, hi], dim=-1).reshape(out, kp // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (out, in) uint8 codes."""
    out = packed.shape[0]
    pairs = packed.reshape(out, -1, BLOCK // 4, 2)             # [.., lane, byte]
    lo, hi = pairs[..., 0], pairs[..., 1]
    q = torch.stack([lo & 0xF, lo >> 4, hi & 0xF, hi >> 4], dim=2)  # [.., nibble, lane]
    return q.reshape(out, -1)[:, :in_features]


def quantize_rtn(w: torch.Tensor, group_size: int, sym: bool = False):
    """Round-to-nearest group-wise 4-bit codes of w (out, in): (q uint8, scales fp32, zeros uint8), each group's
    range [min, max] (asymmetric, always containing 0) or [-max|w|, max|w|] (symmetric, z = 8) mapped onto 0..15."""
    out, k = w.shape
    n_groups = -(-k // group_size)
    wp = F.pad(w.float(), (0, n_groups * group_size - k)).reshape(out, n_groups, group_size)
    if sym:
        scales = (wp.abs().amax(dim=2) / 7.5).clamp(min=1e-10)  # codes -8..7 around z = 8, 7.5 balances ends
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = wp.amin(dim=2).clamp(max=0), wp.amax(dim=2).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-10)
        zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(wp / scales[..., None] + zeros[..., None]).clamp(0, 15)
    q = q.reshape(out, -1)[:, :k].to(torch.uint8)
    return q, scales, zeros.to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (out, in) from codes (out, in), scales and zeros (out, n_groups); fp32 arithmetic, then `dtype`."""
    out, k = q.shape
    n_groups = scales.shape[1]
    qf = F.pad(q, (0, n_groups * group_size - k)).view(out, n_groups, group_size).float()
    w = (qf - zeros.float()[..., None]).mul_(scales.float()[..., None])
    return w.view(out, -1)[:, :k].to(dtype)


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W.T + b with W held as group-wise 4-bit codes (see the module docstring for the layout)."""

    keep_dtype = ("scales",)  # loading a checkpoint in the model dtype leaves these fp32 (checkpoint._install)

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device=None, act_order: bool = False):
        super().__init__()
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dtype = dtype
        n_groups = -(-in_features // group_size)
        kp = -(-in_features // BLOCK) * BLOCK
        self.register_buffer("qweight", torch.zeros(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.full((out_features, n_groups), 8, dtype=torch.uint8, device=device))
        self.register_buffer("input_perm", torch.arange(in_features, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._torch_pack = None  # (packed weight, scales_and_zeros) for torch's int4 op, made when chosen

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_unpacked(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, *,
                      g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.bfloat16) -> "Int4WeightOnlyLinear":
        """The layer computing W[o, i] = (q[o, i] - zeros[o, g(i)]) * scales[o, g(i)], g(i) = i // group_size or
        g_idx[i]. q uint8/int (out, in) in 0..15; scales (out, n_groups) float; zeros (out, n_groups) integer
        values in 0..15 (float or int dtype); g_idx LongTensor (in,) (GPTQ act-order) or None; bias (out,)."""
        if q.dim() != 2:
            raise ValueError(f"q must be (out, in), got shape {tuple(q.shape)}")
        out, k = q.shape
        if q.is_floating_point() or int(q.min()) < 0 or int(q.max()) > 15:
            raise ValueError("q must hold integer codes in 0..15")
        perm = None
        if g_idx is not None:
            g_idx = torch.as_tensor(g_idx).long()
            if g_idx.shape != (k,):
                raise ValueError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
            perm = torch.argsort(g_idx, stable=True)
            counts = torch.bincount(g_idx[perm], minlength=scales.shape[-1] if scales.dim() == 2 else 0)
            if counts.numel() != -(-k // group_size) or bool((counts[:-1] != group_size).any()) \
                    or int(counts[-1]) != k - group_size * (counts.numel() - 1):
                raise ValueError(f"g_idx does not assign exactly group_size={group_size} columns to each group")
            if bool((perm == torch.arange(k)).all()):
                perm = None  # already in order: no gather needed
            else:
                q = q[:, perm]
        n_groups = -(-k // group_size)
        if tuple(scales.shape) != (out, n_groups) or tuple(zeros.shape) != (out, n_groups):
            raise ValueError(f"scales and zeros must be ({out}, {n_groups}) for in={k}, group_size={group_size}; "
                             f"got {tuple(scales.shape)} and {tuple(zeros.shape)}")
        zf = zeros.float()
        if bool((zf != torch.round(zf)).any()) or float(zf.min()) < 0 or float(zf.max()) > 15:
            raise ValueError("zeros must be integer zero points in 0..15")
        layer = cls(k, out, group_size, bias is not None, dtype, q.device, act_order=perm is not None)
        layer.qweight.copy_(pack_nibbles(q.to(torch.uint8)))
        layer.scales.copy_(scales.float())
        layer.zeros.copy_(zf.to(torch.uint8))
        if perm is not None:
            layer.input_perm.copy_(perm)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, sym: bool = False,
                    dtype: torch.dtype | None = None) -> "Int4WeightOnlyLinear":
        """Round-to-nearest quantization of a Linear's weight (asymmetric unless sym)."""
        w = linear.weight.detach()
        q, s, z = quantize_rtn(w, group_size, sym)
        return cls.from_unpacked(q, s, z, group_size, bias=linear.bias, dtype=dtype or w.dtype)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` / `.bfloat16()` leave `scales` fp32 (what the kernel reads; a bf16 copy would
        also lose precision) and set the layer's activation dtype instead."""
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype is not torch.float32:
            self.dtype = self.scales.dtype
            self._buffers["scales"] = scales.to(self.scales.device)
        return self

    # ---------------------------------------------------------------------------------------------- reading
    def unpacked(self) -> torch.Tensor:
        """The codes (out, in) in the layer's column order (after `input_perm` where there is one)."""
        return unpack_nibbles(self.qweight, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in the original column order (act-order permutation undone)."""
        w = dequantize(self.unpacked(), self.scales, self.zeros, self.group_size, dtype or self.dtype)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)
        return w

    # ---------------------------------------------------------------------------------------------- running
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_perm is None else x.index_select(-1, self.input_perm)

    def choice(self, x: torch.Tensor) -> str | None:
        """`choose`'s "int4_gemv" pick for few rows of x (kernel / torch's int4 op), None: today's rule."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.device.type != "cpu" or x.dtype is not torch.bfloat16 or not 0 < rows <= cpu_int4.MAX_ROWS \
                or not cpu_int4.usable(self.in_features, self.group_size):
            return None
        n, k = self.out_features, self.in_features
        route = choose.decide("int4_gemv", (rows, n, k, self.group_size), lambda: self._trial(rows),
                              timed=n * k >= choose.MIN_INT_WEIGHT)
        if route != "torch" and self._torch_pack is not None:
            self._torch_pack = None  # made for the timing only: not a second copy of the weight for nothing
        return route

    def _trial(self, rows: int) -> choose.Trial:
        x = torch.randn(rows, self.in_features, dtype=torch.bfloat16)
        c = min(self.out_features, 1024)
        cands = {"kernel": lambda: self._kernel(x), "torch": lambda: self._torch_int4(x),
                 "intdot": lambda: self._intdot(x)}
        ref = lambda: F.linear(x.float(), self.dequantized_weight(torch.float32)[:c])  # noqa: E731
        return choose.Trial(cands, ref, lambda y: y[:, :c].float(), ("kernel", "torch"))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_int4.linear_int4(self._gather(x), self.qweight, self.scales, self.zeros, self.group_size)

    def _intdot(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_int4.linear_int4_intdot(self._gather(x), self.qweight, self.scales, self.zeros, self.group_size)

    def _torch_int4(self, x: torch.Tensor) -> torch.Tensor | None:
        """torch's own CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`): W = (q - 8) * s + m per group, so
        m = (8 - z) * s; it needs its own packed copy of the codes (made once, kept while chosen)."""
        if self.in_features % self.group_size or self.group_size not in (32, 64, 128, 256) \
                or self.out_features % 16 or x.dtype is not torch.bfloat16:
            return None
        if self._torch_pack is None:
            packed = torch._convert_weight_to_int4pack_for_cpu(self.unpacked().to(torch.int32), 1)
            s = self.scales
            sz = torch.stack([s, (8.0 - self.zeros.float()) * s], dim=-1).transpose(0, 1).contiguous()
            self._torch_pack = (packed, sz.to(torch.bfloat16))
        packed, sz = self._torch_pack
        x2 = self._gather(x).reshape(-1, self.in_features).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        return y.view(*x.shape[:-1], self.out_features)

    def _dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W dequantized into x's dtype in tiles of output rows (tiles.py)."""
        return dequantized_matmul(self._gather(x), self.out_features, self.in_features, self._dequant_rows)

    def _dequant_rows(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """W[n0:n1] in `dtype`; bf16 on the CPU comes in this thread's reused tile buffer (consume it at once)."""
        if dtype is torch.bfloat16:  # the C loop: ~10x torch's elementwise ops (8960 x 1536: ~8 vs 86 ms, 1 thread)
            w = cpu_int4.dequantize_bf16(self.qweight[n0:n1], self.scales[n0:n1], self.zeros[n0:n1],
                                         self.in_features, self.group_size, reuse=True)
            if w is not None:
                return w
        q = unpack_nibbles(self.qweight[n0:n1], self.in_features)
        return dequantize(q, self.scales[n0:n1], self.zeros[n0:n1], self.group_size, dtype)

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """`with_bias=False`: without the bias (the vision MLP adds it fused with its activation)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        y = None
        if not (torch.is_grad_enabled() and x.requires_grad):
            route = self.choice(x)
            y = self._torch_int4(x) if route == "torch" else self._intdot(x) if route == "intdot" else None
            y = self._kernel(x) if y is None else y
        if y is None:
            y = self._dequantized_matmul(x)
        return y if self.bias is None or not with_bias else y + self.bias

    def extra_repr(self) -> str:
        order = ", act-order" if self.input_perm is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size=" \
               f"{self.group_size}{order}"
