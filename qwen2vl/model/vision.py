"""Qwen2-VL vision tower (naive dynamic resolution ViT).

Input: `pixel_values (N, C*T*p*p)` rows of all images (or videos) concatenated in processor order, and
`grid_thw (num_items, 3)` in patch units. Output: merged features `(N / m², hidden_size)`, the LLM's width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import Qwen2VLVisionConfig
from ..kernels import choose
from ..kernels.backend import KernelOps, quick_gelu, rotate_half
from ..kernels.backend import current as current_ops
from ..kernels.build import has_native_bf16_matmul
from ..kernels.prepacked import PrepackedLinear
from ..vision_inputs import check_media
from .attention import vision_attention, vision_segments
from .pretrained import Qwen2VLPreTrainedModel
from .rope_index import vision_cu_seqlens, vision_position_ids


_ACT = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

# CPU inference runs the tower's row-wise work (the linears, the MLP, the merger) over chunks of ROWS patches
# (attention mixes rows: it runs whole, in query slices in `VisionEncodeJob`). Why: a large picture's (rows,
# 4*dim) MLP hidden state stays in cache instead of being mapped fresh (> 32 MB, zero-filled by the kernel on every
# call), and `VisionEncodeJob` runs these same chunks as its units, so the engine can encode a picture a few
# milliseconds at a time between decode steps with the bits of this one-shot forward. (Not on a GPU: launches.)
# 512: on a 2-core Zen 4 the 2B qkv linear of a 1024x768 picture costs in 256-row chunks +11 % CPU time over one
# whole-sequence call, in 512-row chunks +4 % (1 thread; 2 threads on a busy machine: +73 % / +43 %, the threads'
# joins waiting on descheduled peers); the MLP is no slower chunked.
ROWS = 512


def row_chunks(x: torch.Tensor, rows: int | None = None) -> range | None:
    """Starts of the `rows`-row (default ROWS) chunks inference runs x (N, features) in; None: one call (GPU,
    autograd, few rows)."""
    rows = rows or ROWS
    if x.dim() != 2 or x.device.type != "cpu" or x.shape[0] <= rows or torch.is_grad_enabled():
        return None
    return range(0, x.shape[0], rows)


def by_rows(fn, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """fn(x) for a row-wise fn, computed over `row_chunks(x, rows)` (`VisionEncodeJob` runs the same chunks)."""
    starts = row_chunks(x, rows)
    if starts is None:
        return fn(x)
    rows = rows or ROWS
    out = None
    for a in starts:
        y = fn(x[a:a + rows])
        if out is None:
            out = y.new_empty(x.shape[0], *y.shape[1:])
        out[a:a + rows] = y
    return out


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d (E, C, T, p, p) with stride = kernel is exactly a bias-free Linear over the
    flattened patch; we keep it as a Linear (E, C*T*p*p) and reshape 5-D checkpoint weights on load."""

    def __init__(self, in_features: int, embed_dim: int):
        super().__init__()
        self.proj = PrepackedLinear(in_features, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_rows(self.proj, x.to(self.proj.weight.dtype))


def vision_rotary(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (N,2) (h,w) → float32 cos/sin (N, head_dim): angle for dim j is (h if j%(D/2) < D/4 else w)·inv_freq."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=pos.device) / spatial))
    freqs = pos[..., None].float() * inv_freq                  # (N, 2, D/4)
    f = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)          # (N, D/2)
    f = torch.cat([f, f], dim=-1)                              # (N, D)
    return f.cos(), f.sin()


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = PrepackedLinear(dim, 3 * dim, bias=True)
        self.proj = PrepackedLinear(dim, dim, bias=True)
        self.attn_implementation = attn_implementation
        self.ops = current_ops()

    def forward(self, x, cu_seqlens, cos, sin):
        qkv = by_rows(self.qkv, x)
        use_kernel, fp32 = self.plan(qkv)
        if use_kernel:
            o = self.ops.vision_attention(qkv, cos, sin, self.num_heads, self.scale,
                                          vision_segments(cu_seqlens, x.device).bounds)
            if o is not None:
                return by_rows(self.proj, o)
        o = self.torch_attention(qkv, cu_seqlens, cos, sin, fp32)
        return by_rows(self.proj, o)

    def plan(self, qkv: torch.Tensor) -> tuple[bool, bool | None]:
        """(use the fused CPU kernel, the torch path's fp32 flag) for this qkv (N, 3*H*D). Long segments on CPU
        go to the fused rotary + flash attention kernel, several times faster than torch's CPU SDPA without AMX
        (with AMX, `choose` may pick SDPA instead). `VisionEncodeJob` follows the same plan."""
        cpu_sdpa = self.attn_implementation == "sdpa" and qkv.device.type == "cpu"
        route = self.choice(qkv) if cpu_sdpa else None
        use_kernel = route in (None, "kernel") and cpu_sdpa and qkv.shape[0] >= 256
        return use_kernel, {"torch": False, "torch_fp32": True}.get(route)

    def torch_attention(self, qkv, cu_seqlens, cos, sin, fp32: bool | None = None) -> torch.Tensor:
        """Rotary (in float32, as the reference) and block-diagonal attention with torch ops: qkv (N, 3*H*D) ->
        (N, H*D). fp32: SDPA on fp32 operands (None: where this CPU has no native bf16 matmul)."""
        n = qkv.shape[0]
        q, k, v = qkv.view(n, 3, self.num_heads, self.head_dim).unbind(1)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        qf, kf = q.float(), k.float()
        q = (qf * c + rotate_half(qf) * s).to(qkv.dtype)
        k = (kf * c + rotate_half(kf) * s).to(qkv.dtype)
        return vision_attention(self.attn_implementation, q, k, v, cu_seqlens, self.scale, fp32).reshape(n, -1)

    def choice(self, qkv: torch.Tensor) -> str | None:
        """`choose`'s "vision_attention" decision for this many rows (None: today's rule)."""
        n, h, d = qkv.shape[0], self.num_heads, self.head_dim
        if qkv.dtype is not torch.bfloat16 or n < 256 or (torch.is_grad_enabled() and qkv.requires_grad):
            return None
        rep = choose.rows_class("vision_attention", n)
        return choose.decide("vision_attention", (rep, h, d), lambda: self._trial(rep), timed=h * d >= choose.MIN_WIDTH)

    def _trial(self, rows: int) -> choose.Trial:
        """The candidates on one random segment of `rows` patches; reference: the torch path in fp32."""
        h, d = self.num_heads, self.head_dim
        qkv = torch.randn(rows, 3 * h * d, dtype=torch.bfloat16)
        cos, sin = vision_rotary(torch.randint(0, 64, (rows, 2)), d)
        seg = vision_segments(torch.tensor([0, rows], dtype=torch.int32), qkv.device)
        sdpa = "torch" if has_native_bf16_matmul() else "torch_fp32"  # bf16 SDPA where bf16 is native
        kernel = KernelOps("trial")
        cands = {"kernel": lambda: kernel.vision_attention(qkv, cos, sin, h, self.scale, [0, rows]),
                 sdpa: lambda: self.torch_attention(qkv, seg, cos, sin, sdpa == "torch_fp32")}
        today = ("kernel", sdpa)
        return choose.Trial(cands, lambda: self.torch_attention(qkv.float(), seg, cos, sin, False), today=today)


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = PrepackedLinear(dim, hidden)
        self.fc2 = PrepackedLinear(hidden, dim)
        self.act = _ACT[act]
        self.ops = current_ops()

    def forward(self, x):
        if row_chunks(x) is None:
            return self.fc2(self.act(self.fc1(x)))
        return by_rows(lambda rows: self.fc2(self.hidden(rows)), x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(fc1(x)) of one row chunk (`VisionEncodeJob` runs it and fc2 as two units)."""
        if self.act is quick_gelu and x.dtype == torch.bfloat16 and self.fc1.bias is not None:
            h = self.fc1(x, with_bias=False)           # fc1 without bias (faster GEMM), then
            return self.ops.bias_quick_gelu(h, self.fc1.bias)  # bias + activation (one pass on the kernel)
        return self.act(self.fc1(x))


class Qwen2VLVisionBlock(nn.Module):
    def __init__(self, config, attn_implementation: str = "sdpa"):
        super().__init__()
        e = config.embed_dim
        self.norm1 = nn.LayerNorm(e, eps=1e-6)
        self.norm2 = nn.LayerNorm(e, eps=1e-6)
        self.attn = VisionAttention(e, config.num_heads, attn_implementation)
        self.mlp = VisionMlp(e, int(e * config.mlp_ratio), config.hidden_act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, concatenate each m x m block (consecutive rows), 2-layer MLP with exact GELU."""

    def __init__(self, dim: int, context_dim: int, merge_size: int):
        super().__init__()
        self.hidden = context_dim * merge_size ** 2
        self.ln_q = nn.LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(PrepackedLinear(self.hidden, self.hidden), nn.GELU(),
                                 PrepackedLinear(self.hidden, dim))

    def forward(self, x):
        return by_rows(self.mlp, self.ln_q(x).view(-1, self.hidden), self.rows)

    @property
    def rows(self) -> int:
        """Merged rows per chunk: those of ROWS patches."""
        return ROWS * self.ln_q.normalized_shape[0] // self.hidden


class Qwen2VisionTransformerPretrainedModel(Qwen2VLPreTrainedModel):
    config_class = Qwen2VLVisionConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["Qwen2VLVisionBlock"]

    def __init__(self, config, attn_implementation: str | None = None):
        attn_implementation = attn_implementation or getattr(config, "attn_implementation", None) or "sdpa"
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        in_features = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_embed = PatchEmbed(in_features, config.embed_dim)
        self.blocks = nn.ModuleList(Qwen2VLVisionBlock(config, attn_implementation) for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, config.embed_dim, config.spatial_merge_size)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def validate(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        """ValueError unless pixel_values (N, C*T*p*p) are exactly the patches grid_thw (n, 3) describes."""
        if pixel_values is None:
            raise ValueError("The vision tower needs pixel values (N, C*T*p*p) with their grid_thw.")
        check_media(None, pixel_values, grid_thw, self.spatial_merge_size, self.patch_embed.proj.in_features)

    def embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """Validated patch embeddings x (N, E) and what every block takes: segments, rotary cos/sin (N, D)."""
        self.validate(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)
        return (x, *self.geometry(grid_thw, x.device))

    def geometry(self, grid_thw: torch.Tensor, device):
        """What every block takes for these grids: segments, rotary cos/sin (N, D); once, not per layer."""
        grid_cpu = grid_thw.cpu()
        pos = vision_position_ids(grid_cpu, self.spatial_merge_size).to(device)
        cos, sin = vision_rotary(pos, self.config.embed_dim // self.config.num_heads)
        return vision_segments(vision_cu_seqlens(grid_cpu), device), cos, sin

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C*T*p*p), grid_thw (n, 3) → merged features (N/m², hidden_size)."""
        x, cu_seqlens, cos, sin = self.embed(pixel_values, grid_thw)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, cu_seqlens, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cu_seqlens, cos, sin)
        return self.merger(x)
