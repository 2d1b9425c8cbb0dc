"""The vision tower as a resumable job: `VisionEncodeJob(visual, pixel_values, grid_thw)`, `run(budget)` a bounded
amount of work at a time, `result` (N/m², hidden) when `done`.

Why: the engine encodes a large picture (a 1024x768 one is ~3900 patches x 32 blocks, tens of seconds on a small
CPU) between the decode steps of the running streams, a slice per step, instead of stalling them.

The work is cut into units that run exactly the operations of the one-shot forward (`visual(pixel_values,
grid_thw)`) on the same rows, so the result has the same bits:
* the patch embedding; per block: norm1 + qkv (all rows); the attention; proj + residual; the MLP in
  `VisionMlp.CHUNK`-row pieces where the one-shot forward uses them (on CPU), else whole; then the merger;
* the attention on the fused CPU kernel runs in slices of `rows` queries, each attending to all keys of its
  picture / frame (the kernel computes every query row alone, so a slice has the bits of the whole call); on the
  torch path (GPU, small inputs, SDPA chosen) it is one unit.
Units cost `flops` (multiply-adds x 2; attention weighted, see ATTENTION_WEIGHT). `run(budget)` runs units while they fit in `budget` flops, and always at
least one, so one call does at most max(budget, largest unit) of work. The largest units grow with the number of
patches (qkv and the MLP pieces are linear in it, each attention slice too): bounded per picture size, not fixed.
"""
from __future__ import annotations

import torch

from ..kernels import cpu_ops as cpu_kernels
from .vision import quick_gelu

ROWS = 1024  # query rows per attention slice (like VisionMlp.CHUNK)
# An attention flop costs more time than a GEMM flop: on a 2-core Zen 4 the fused kernel ran 32 GF/s where the
# tower's linears ran 43-49 (same load, 2B shapes, 3888 patches): attention units are counted 1.5x.
ATTENTION_WEIGHT = 1.5


def _linear(rows: int, linear) -> int:
    return 2 * rows * linear.in_features * linear.out_features


class VisionEncodeJob:
    def __init__(self, visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, rows: int = ROWS):
        visual.validate(pixel_values, grid_thw)  # bad inputs fail here, before any work is scheduled
        self.visual, self.rows, self.grid_thw = visual, rows, grid_thw
        self.result: torch.Tensor | None = None
        self.units_run = 0
        self.total_flops = 0
        self._steps = self._units(pixel_values, grid_thw)
        self._next: int | None = next(self._steps)  # cost of the next unit; None when done (nothing ran yet)

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def next_cost(self) -> int:
        """Flops of the next unit (0 when done)."""
        return self._next or 0

    def run(self, budget: float) -> int:
        """Run units while they fit in `budget` flops (at least one); returns the flops spent."""
        spent = 0
        while self._next is not None and (spent == 0 or spent + self._next <= budget):
            spent += self._next
            self._next = next(self._steps, None)
            self.units_run += 1
        self.total_flops += spent
        return spent

    def _units(self, pixel_values, grid_thw):
        """Yields the cost of each unit just before running it; leaves the merged features in `result`."""
        v = self.visual
        n = pixel_values.shape[0]
        yield _linear(n, v.patch_embed.proj)
        x, cu_seqlens, cos, sin = v.embed(pixel_values, grid_thw)
        bounds = cu_seqlens.bounds
        for blk in v.blocks:
            attn, mlp = blk.attn, blk.mlp
            e = attn.proj.in_features
            yield _linear(n, attn.qkv)
            qkv = attn.qkv(blk.norm1(x))
            use_kernel, fp32 = attn.plan(qkv)
            o = None
            if use_kernel:
                o = yield from self._kernel_attention(attn, qkv, cos, sin, bounds)
            if o is None:
                yield int(ATTENTION_WEIGHT * sum(4 * (b - a) ** 2 * e for a, b in zip(bounds[:-1], bounds[1:])))
                o = attn.torch_attention(qkv, cu_seqlens, cos, sin, fp32)
            yield _linear(n, attn.proj)
            x = x + attn.proj(o)
            h = blk.norm2(x)
            if mlp.chunked(h):
                m = h.new_empty(n, mlp.fc2.out_features)
                for a in range(0, n, mlp.CHUNK):
                    yield _linear(min(mlp.CHUNK, n - a), mlp.fc1) + _linear(min(mlp.CHUNK, n - a), mlp.fc2)
                    mlp.rows_into(h, a, m)
            else:
                yield _linear(n, mlp.fc1) + _linear(n, mlp.fc2)
                m = mlp(h)
            x = x + m
        yield _linear(n // v.spatial_merge_size ** 2, v.merger.mlp[0]) + \
            _linear(n // v.spatial_merge_size ** 2, v.merger.mlp[2])
        self.result = v.merger(x)

    def _kernel_attention(self, attn, qkv, cos, sin, bounds):
        """The fused kernel's attention in query slices (a generator: yields each slice's cost); None if the
        kernel cannot run (then the caller takes the torch path, as the one-shot forward does)."""
        qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
        e = qkv.shape[1] // 3
        out = torch.empty(qkv.shape[0], e, dtype=qkv.dtype)
        for a, b in zip(bounds[:-1], bounds[1:]):
            for q0 in range(a, b, self.rows):
                q1 = min(b, q0 + self.rows)
                yield int(ATTENTION_WEIGHT * 4 * (q1 - q0) * (b - a) * e)
                if not cpu_kernels.vision_attention_rows(qkv, cos, sin, attn.num_heads, attn.scale, (a, b),
                                                         (q0, q1), out):
                    return None
        return out


def make_choices(visual, num_patches: int) -> None:
    """Make now the kernel choices (`choose`, timed once per machine) that a job over `num_patches` rows will ask
    for: the engine calls this on a processing thread, so that timing candidates never stalls a step."""
    dtype = visual.dtype
    if visual.patch_embed.proj.weight.device.type != "cpu" or dtype is not torch.bfloat16:
        return

    def rows(n: int, width: int) -> torch.Tensor:  # the shape a call site sees (no memory: decisions read shapes)
        return torch.zeros((), dtype=dtype).expand(n, width)

    def decide(linear, n: int, bias: bool = True) -> None:
        linear.choice(rows(n, linear.in_features), linear.bias if bias else None)

    blk, n = visual.blocks[0], num_patches
    attn, mlp = blk.attn, blk.mlp
    decide(visual.patch_embed.proj, n)
    decide(attn.qkv, n)
    attn.choice(rows(n, attn.qkv.out_features))
    decide(attn.proj, n)
    chunked = mlp.chunked(rows(n, mlp.fc1.in_features))
    fused_bias = chunked and mlp.act is quick_gelu and mlp.fc1.bias is not None  # as rows_into: fc1 without bias
    for m in sorted({min(mlp.CHUNK, n - a) for a in range(0, n, mlp.CHUNK)} if chunked else {n}):
        decide(mlp.fc1, m, bias=not fused_bias)
        decide(mlp.fc2, m)
    merged = n // visual.spatial_merge_size ** 2
    decide(visual.merger.mlp[0], merged)
    decide(visual.merger.mlp[2], merged)


def text_flops_per_token(text_config) -> int:
    """Flops of one prompt token through the decoder's linears (attention over the context aside): the unit that
    turns the engine's prefill-token budget into a vision budget."""
    h, i = text_config.hidden_size, text_config.intermediate_size
    hd = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    q = text_config.num_attention_heads * hd
    kv = text_config.num_key_value_heads * hd
    return 2 * text_config.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * i)
