"""The op layer the model's modules call: `TorchOps` (PyTorch only) or `KernelOps` (the C kernels where they
apply), chosen once per process by `current()` and logged once; each module keeps the object it was built with
(`self.ops`), and no model file decides between a kernel and torch itself.

`KernelOps` asks `cpu.py` / `cpu_ops.py` whether the kernel applies to this call (bf16 on CPU, no autograd, the
shapes it handles, what `choose.py` measured for the shape class) and otherwise runs `TorchOps`' reference, which is
also the whole of `TorchOps` (no compiler, no AVX2, QWEN2VL_DISABLE_KERNELS=1). Every method returns the op's result
(nothing returns None), except the fused decoding step, which says whether it ran.

Shapes: x (..., K) / (B, S, H) activations; q, k, v (B, H, S, D); cos/sin (B, S, D) (text) or (N, D) (vision).
"""
from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from ..settings import settings
from . import build, cpu, cpu_ops

log = logging.getLogger(__name__)
_linear_op = torch.ops.qwen2vl.linear.default
TORCH_DECODE_SLOWDOWN = "~2-4x"  # decoding one sequence on PyTorch ops vs the kernels (README "Speed", 2B, 2 cores)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return x * torch.sigmoid(1.702 * x)
    # Same arithmetic, one temporary updated in place: half the memory passes of the expression above.
    t = torch.mul(x, 1.702)
    torch.sigmoid_(t)
    return t.mul_(x)


class TorchOps:
    """Every op as PyTorch computes it (the reference the kernels are bit-identical or close to)."""
    name = "torch"

    def __deepcopy__(self, memo):  # stateless: copies of a model share it
        return self

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        # The reference casts back before the weight multiply; keep that order for bit-level parity.
        return weight * x32.to(dtype)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections q (B,S,Hq*D), k (B,S,Hkv*D) -> rotated q (B,Hq,S,D), k (B,Hkv,S,D); cos/sin (B,S,D)."""
        b, s = q.shape[:2]
        q, k = (t.view(b, s, -1, head_dim).transpose(1, 2) for t in (q, k))
        c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up (in place on gate at inference: no temporaries)."""
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return F.silu(gate) * up
        return F.silu(gate, inplace=True).mul_(up)

    def bias_quick_gelu(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """quick_gelu(h + bias) for h (rows, N) without its bias yet."""
        return quick_gelu(h + bias)

    def vision_attention(self, qkv, cos, sin, num_heads: int, scale: float, bounds: list[int]):
        """Fused rotary + block-diagonal attention of qkv (N, 3*H*D) -> (N, H*D), or None: run the torch path
        (`VisionAttention.torch_attention`)."""
        return None

    def decode_attention(self, q, k, v, mask, scale: float):
        """One query per row over the cache, or None: run SDPA."""
        return None

    def prefill_attention(self, q, k, v, scale: float):
        """Causal prefill of rows alike, or None: run SDPA."""
        return None

    def decode_layers(self, *args) -> bool:
        """The whole decoder stack for one decoding step in one call (cpu_ops.decode_layers); False: not run."""
        return False


class KernelOps(TorchOps):
    """The C kernels where each call qualifies, else `TorchOps`."""

    def __init__(self, description: str):
        self.name = description

    def linear(self, x, weight, bias):
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return F.linear(x, weight, bias)
        return _linear_op(x, weight, bias)  # cpu.linear as an op: torch.compile keeps it whole

    def rms_norm(self, x, weight, eps):
        y = cpu_ops.rms_norm(x, weight, eps)  # bf16 on CPU: one call instead of eight ops
        return y if y is not None else super().rms_norm(x, weight, eps)

    def rope(self, q, k, cos, sin, head_dim):
        qr = cpu_ops.rope(q, cos, sin, head_dim)  # bf16 on CPU: one kernel call each
        kr = cpu_ops.rope(k, cos, sin, head_dim) if qr is not None else None
        if kr is None:
            return super().rope(q, k, cos, sin, head_dim)
        b, s = q.shape[:2]
        return qr.view(b, s, -1, head_dim).transpose(1, 2), kr.view(b, s, -1, head_dim).transpose(1, 2)

    def silu_mul(self, gate, up):
        if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)) and cpu_ops.silu_mul_(gate, up):
            return gate  # one pass, bit-identical to the torch line
        return super().silu_mul(gate, up)

    def bias_quick_gelu(self, h, bias):
        if cpu_ops.bias_quick_gelu_(h, bias):  # bias + activation in one pass
            return h
        return super().bias_quick_gelu(h, bias)

    def vision_attention(self, qkv, cos, sin, num_heads, scale, bounds):
        return cpu_ops.vision_attention(qkv, cos, sin, num_heads, scale, bounds)

    def decode_attention(self, q, k, v, mask, scale):
        return cpu_ops.decode_attention(q, k, v, mask, scale)

    def prefill_attention(self, q, k, v, scale):
        return cpu_ops.prefill_attention(q, k, v, scale)

    def decode_layers(self, *args) -> bool:
        return cpu_ops.decode_layers(*args)


class KernelLinear(torch.nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward runs its op layer's `linear`: on CPU the GEMV
    kernel for few rows (decoder projections, LM head) where `choose` keeps it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ops = current()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


_lock = threading.Lock()
_current: TorchOps | None = None


def select() -> tuple[TorchOps, str]:
    """The op layer for this machine and settings, and the line `current` logs. The library itself is built on
    the first kernel call (a CUDA-only user never compiles it); a failed build logs its own line (build.py) and
    every KernelOps call then runs the reference."""
    isa = build.flavour()
    if settings().disable_kernels:
        return TorchOps(), "QWEN2VL_DISABLE_KERNELS is set: using PyTorch ops"
    if isa is None:
        return TorchOps(), "no AVX2 / AVX512 CPU: using PyTorch ops for CPU work"
    if build.compiler() is None:
        return TorchOps(), f"no C compiler: using PyTorch ops (expect {TORCH_DECODE_SLOWDOWN} slower CPU decoding)"
    bf16 = "AVX512-BF16 dot products" if build.has_avx512bf16() else "no AVX512-BF16" if isa == "avx512" else "8-lane"
    ops = KernelOps(f"C kernels ({isa} build, {bf16})")
    return ops, f"CPU ops: {ops.name}"


def current() -> TorchOps:
    """This process's op layer: chosen on first use (a model's construction), logged once, then the same object."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                ops, line = select()
                (log.warning if "no C compiler" in line else log.info)("qwen2vl: %s", line)
                _current = ops
    return _current
