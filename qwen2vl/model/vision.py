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


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d (E, C, T, p, p) with stride = kernel is exactly a bias-free Linear over the
    flattened patch; we keep it as a Linear (E, C*T*p*p) and reshape 5-D checkpoint weights on load."""

    def __init__(self, in_features: int, embed_dim: int):
        super().__init__()
        self.proj = PrepackedLinear(in_features, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


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
        qkv = self.qkv(x)
        use_kernel, fp32 = self.plan(qkv)
        if use_kernel:
            o = self.ops.vision_attention(qkv, cos, sin, self.num_heads, self.scale,
                                          vision_segments(cu_seqlens, x.device).bounds)
            if o is not None:
                return self.proj(o)
        o = self.torch_attention(qkv, cu_seqlens, cos, sin, fp32)
        return self.proj(o)

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
    # Inference runs the MLP over row chunks: the (rows, 4*dim) hidden state of a whole large image is > 32 MB,
    # which glibc maps fresh (and the kernel zero-fills) on every call; 1024-row chunks are reused from the heap
    # and stay in cache between fc1, the activation and fc2. (CPU only: on a GPU they would only add launches.)
    CHUNK = 1024

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = PrepackedLinear(dim, hidden)
        self.fc2 = PrepackedLinear(hidden, dim)
        self.act = _ACT[act]
        self.ops = current_ops()

    def forward(self, x):
        if not self.chunked(x):
            return self.fc2(self.act(self.fc1(x)))
        out = x.new_empty(x.shape[0], self.fc2.out_features)
        for a in range(0, x.shape[0], self.CHUNK):
            self.rows_into(x, a, out)
        return out

    def chunked(self, x: torch.Tensor) -> bool:
        """Whether this input runs in CHUNK-row pieces (`rows_into`; `VisionEncodeJob` runs the same pieces)."""
        return not (x.shape[0] <= self.CHUNK or (torch.is_grad_enabled() and x.requires_grad) or x.dim() != 2
                    or x.device.type != "cpu")

    def rows_into(self, x: torch.Tensor, a: int, out: torch.Tensor) -> None:
        """out[a:a + CHUNK] = mlp(x[a:a + CHUNK])."""
        if self.act is quick_gelu and x.dtype == torch.bfloat16 and self.fc1.bias is not None:
            h = self.fc1(x[a:a + self.CHUNK], with_bias=False)  # fc1 without bias (faster GEMM), then
            h = self.ops.bias_quick_gelu(h, self.fc1.bias)        # bias + activation (one pass on the kernel)
        else:
            h = self.act(self.fc1(x[a:a + self.CHUNK]))
        out[a:a + self.CHUNK] = self.fc2(h)


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
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


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
        grid_cpu = grid_thw.cpu()
        x = self.patch_embed(pixel_values)
        pos = vision_position_ids(grid_cpu, self.spatial_merge_size).to(x.device)
        cos, sin = vision_rotary(pos, self.config.embed_dim // self.config.num_heads)
        cu_seqlens = vision_segments(vision_cu_seqlens(grid_cpu), x.device)  # once, not per layer
        return x, cu_seqlens, cos, sin

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C*T*p*p), grid_thw (n, 3) → merged features (N/m², hidden_size)."""
        x, cu_seqlens, cos, sin = self.embed(pixel_values, grid_thw)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, cu_seqlens, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cu_seqlens, cos, sin)
        return self.merger(x)
