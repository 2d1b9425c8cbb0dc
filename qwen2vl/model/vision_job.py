"""The vision tower as a resumable job: `VisionEncodeJob(visual, pixel_values, grid_thw)`, `run(budget, weights)` a
bounded amount of work at a time, `result` (N/m², hidden) when `done`.

Why: the engine encodes a large picture (a 1024x768 one is ~3900 patches x 32 blocks, tens of seconds on a small
CPU) between the decode steps of the running streams, a slice per step, instead of stalling them.

The work is cut into units that run exactly the operations of the one-shot forward (`visual(pixel_values,
grid_thw)`) on the same rows, so the result has the same bits. On CPU the one-shot forward runs its row-wise work
in `vision.ROWS`-row chunks (`vision.by_rows`); each chunk is a unit here:
* the patch embedding per chunk; per block: qkv per chunk (norm1 over all rows first, as the one-shot forward);
  the attention; proj per chunk + the residual; the MLP's fc1 + activation and its fc2 per chunk, two units;
  then the merger's two linears per chunk of merged rows;
* the attention on the fused CPU kernel runs in slices of ~SLICE_FLOPS, a few heads x a range of queries, each
  attending to all keys of its picture / frame (the kernel computes every (query row, head) alone, so a slice has
  the bits of the whole call); on the torch path (GPU, small inputs, SDPA chosen) it is one unit, as are the
  linears on a GPU (no chunks there).
So on CPU no unit grows with the picture: on the 2B tower (dim 1280, MLP 5120) a linear unit is 1.5-6.7 GF and an
attention slice ~3 GF (2 threads: 2 heads x 1168 queries of a 1024x768 picture).

Each unit has (flops, kind), kind LINEAR or ATTENTION (multiply-adds x 2). `run(budget, weights)` runs units
while their cost, flops x weights[kind], fits in `budget`, and always at least one (unless told otherwise): with
FLOP_WEIGHTS the budget is in linear-equivalent flops; with seconds per flop per kind (measured: `timings`) it is
in seconds. A weight of inf (kind not measured yet) lets a unit run only alone, which measures it.
"""
from __future__ import annotations

import time

import torch

from ..kernels import cpu_ops as cpu_kernels
from . import vision
from .vision import quick_gelu

LINEAR, ATTENTION = "linear", "attention"
# An attention flop costs more time than a GEMM flop: on a 2-core Zen 4 the fused kernel ran 32 GF/s where the
# tower's linears ran 43-49 (same load, 2B shapes, 3888 patches): attention units are counted 1.5x.
FLOP_WEIGHTS = {LINEAR: 1.0, ATTENTION: 1.5}
SLICE_FLOPS = 3e9  # flops of one attention slice (~ the 2B tower's linear units; see attention_slices)


def _linear(rows: int, linear) -> tuple[int, str]:
    return 2 * rows * linear.in_features * linear.out_features, LINEAR


def attention_slices(keys: int, num_heads: int, head_dim: int, rows: int | None = None) -> tuple[int, int]:
    """(heads, query rows) per attention slice of a segment of `keys` patches: as many heads as threads (each
    thread one head), and ~SLICE_FLOPS of work: a multiple of 16 query rows (the kernel pads queries to groups of
    4), at least 16. A call packs the keys / values of its heads (a pass over the segment), so few heads x many
    queries repeats that pass far less than all heads x few queries. `rows` forces the query rows (all heads)."""
    if rows is not None:
        return num_heads, rows
    heads = max(1, min(num_heads, torch.get_num_threads()))
    return heads, max(16, int(SLICE_FLOPS / (4 * keys * head_dim * heads)) // 16 * 16)


class VisionEncodeJob:
    def __init__(self, visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, rows: int | None = None,
                 clock=time.perf_counter):
        """rows: query rows per attention slice (default `slice_rows`); clock: times the units (`timings`)."""
        visual.validate(pixel_values, grid_thw)  # bad inputs fail here, before any work is scheduled
        self.visual, self.rows, self.grid_thw, self.clock = visual, rows, grid_thw, clock
        self.result: torch.Tensor | None = None
        self.units_run = 0
        self.total_flops = 0
        self.timings: dict[str, list[float]] = {}  # kind -> [flops, seconds] of the units run so far
        self._steps = self._units(pixel_values, grid_thw)
        self._next: tuple[int, str] | None = next(self._steps)  # (flops, kind) of the next unit; None when done

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def next_unit(self) -> tuple[int, str] | None:
        """(flops, kind) of the next unit (None when done)."""
        return self._next

    @property
    def next_cost(self) -> float:
        """FLOP_WEIGHTS cost of the next unit (0 when done)."""
        return 0 if self._next is None else _cost(self._next, FLOP_WEIGHTS)

    def run(self, budget: float, weights: dict | None = None, at_least_one: bool = True) -> float:
        """Run units while their cost (flops x weights[kind], default FLOP_WEIGHTS) fits in `budget`, and at least
        one if `at_least_one`; returns the cost spent."""
        weights = weights or FLOP_WEIGHTS
        spent = 0.0
        while self._next is not None:
            cost = _cost(self._next, weights)
            if (spent or not at_least_one) and spent + cost > budget:
                break
            (flops, kind), t0 = self._next, self.clock()
            self._next = next(self._steps, None)  # runs the unit
            took = self.timings.setdefault(kind, [0, 0.0])
            took[0] += flops
            took[1] += self.clock() - t0
            spent += cost
            self.units_run += 1
            self.total_flops += flops
        return spent

    def _units(self, pixel_values, grid_thw):
        """Yields (flops, kind) of each unit just before running it; leaves the merged features in `result`."""
        v = self.visual
        x = yield from self._by_rows(pixel_values.to(v.dtype), [(v.patch_embed.proj, v.patch_embed.proj)])
        cu_seqlens, cos, sin = v.geometry(grid_thw, x.device)
        bounds = cu_seqlens.bounds
        for blk in v.blocks:
            attn, mlp = blk.attn, blk.mlp
            qkv = yield from self._by_rows(blk.norm1(x), [(attn.qkv, attn.qkv)])
            use_kernel, fp32 = attn.plan(qkv)
            o = None
            if use_kernel:
                o = yield from self._kernel_attention(attn, qkv, cos, sin, bounds)
            if o is None:
                e = attn.proj.in_features
                yield sum(4 * (b - a) ** 2 * e for a, b in zip(bounds[:-1], bounds[1:])), ATTENTION
                o = attn.torch_attention(qkv, cu_seqlens, cos, sin, fp32)
            x = x + (yield from self._by_rows(o, [(attn.proj, attn.proj)]))
            # the MLP as VisionMlp.forward: fc1 + activation (fused bias on chunks), then fc2; two units per chunk
            x = x + (yield from self._by_rows(blk.norm2(x), [(mlp.hidden, mlp.fc1), (mlp.fc2, mlp.fc2)],
                                              whole=[(lambda h: mlp.act(mlp.fc1(h)), mlp.fc1), (mlp.fc2, mlp.fc2)]))
        m = v.merger  # as PatchMerger.forward: its Sequential (linear, GELU, linear) per chunk of merged rows
        first = lambda h: m.mlp[1](m.mlp[0](h))  # noqa: E731
        stages = [(first, m.mlp[0]), (m.mlp[2], m.mlp[2])]
        self.result = yield from self._by_rows(m.ln_q(x).view(-1, m.hidden), stages, rows=m.rows)

    def _by_rows(self, x, stages, rows=None, whole=None):
        """`vision.by_rows(f, x, rows)` for f = the stages' fns in turn, one unit per stage and chunk (a generator:
        yields each unit's (flops, kind), returns the result). stages: [(fn, the linear whose flops it costs)];
        whole: the stages where x runs in one call (default the same)."""
        starts = vision.row_chunks(x, rows)
        if starts is None:
            for fn, linear in whole or stages:
                yield _linear(x.shape[0], linear)
                x = fn(x)
            return x
        rows = rows or vision.ROWS
        out = None
        for a in starts:
            y = x[a:a + rows]
            for fn, linear in stages:
                yield _linear(y.shape[0], linear)
                y = fn(y)
            if out is None:
                out = y.new_empty(x.shape[0], *y.shape[1:])
            out[a:a + rows] = y
        return out

    def _kernel_attention(self, attn, qkv, cos, sin, bounds):
        """The fused kernel's attention in slices of heads x queries (a generator: yields each slice's (flops,
        kind)); None if the kernel cannot run (then the caller takes the torch path, as the one-shot forward
        does)."""
        qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
        h, d = attn.num_heads, attn.head_dim
        out = torch.empty(qkv.shape[0], h * d, dtype=qkv.dtype)
        for a, b in zip(bounds[:-1], bounds[1:]):
            heads, rows = attention_slices(b - a, h, d, self.rows)
            for h0 in range(0, h, heads):
                h1 = min(h, h0 + heads)
                for q0 in range(a, b, rows):
                    q1 = min(b, q0 + rows)
                    yield 4 * (q1 - q0) * (b - a) * d * (h1 - h0), ATTENTION
                    if not cpu_kernels.vision_attention_rows(qkv, cos, sin, h, attn.scale, (a, b), (q0, q1), out,
                                                             (h0, h1)):
                        return None
        return out


def _cost(unit: tuple[int, str], weights: dict) -> float:
    flops, kind = unit
    return flops * weights[kind] if flops else 0.0


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

    def sizes(n: int, rows_per_chunk: int | None = None) -> set[int]:  # the row counts `vision.by_rows` calls with
        starts = vision.row_chunks(rows(n, 1), rows_per_chunk)
        return {n} if starts is None else {min(rows_per_chunk or vision.ROWS, n - a) for a in starts}

    blk, n = visual.blocks[0], num_patches
    attn, mlp, merger = blk.attn, blk.mlp, visual.merger
    chunked = vision.row_chunks(rows(n, 1)) is not None
    fused_bias = chunked and mlp.act is quick_gelu and mlp.fc1.bias is not None  # as VisionMlp.hidden
    for m in sizes(n):
        for linear in (visual.patch_embed.proj, attn.qkv, attn.proj, mlp.fc2):
            decide(linear, m)
        decide(mlp.fc1, m, bias=not fused_bias)
    attn.choice(rows(n, attn.qkv.out_features))
    merged = n // visual.spatial_merge_size ** 2
    for m in sizes(merged, merger.rows):
        decide(merger.mlp[0], m)
        decide(merger.mlp[2], m)


def text_flops_per_token(text_config) -> int:
    """Flops of one prompt token through the decoder's linears (attention over the context aside): the unit that
    turns the engine's prefill-token budget into a vision budget."""
    h, i = text_config.hidden_size, text_config.intermediate_size
    hd = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    q = text_config.num_attention_heads * hd
    kv = text_config.num_key_value_heads * hd
    return 2 * text_config.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * i)
