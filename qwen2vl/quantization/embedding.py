"""Optional quantized storage beyond the decoder's projections (`quantize_model(..., embedding=, vision=)`):

* the token embedding as the rows of a weight-only quantized (vocab, hidden) matrix: int8 with one scale per token
  row, or int4 group-wise; a lookup dequantizes only the looked-up rows. With tied embeddings the LM head *is* that
  matrix (the same module), as llama.cpp's tied GGUFs read token_embd for the output too: int8 rows are then
  exactly the int8-per-channel head the int4 default already uses, and no second copy of the vocabulary is kept.
* the vision tower's linears (qkv, proj, fc1, fc2 and the merger's two) as int8 per output channel or int4
  group-wise; they see many rows, so they dequantize a tile of the weight at a time into bf16 and run the float
  matmul (tiles.py); the patch embedding (0.2 % of the tower) stays in floating point.

On the 2B these are what decide the file size (`benchmarks/bench_int4.py --sizes-only`): the decoder's projections
are 59 % of the bf16 file, the vision tower 30 %, the embedding 11 %.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .int4 import Int4WeightOnlyLinear, dequantize, quantize_rtn, unpack_nibbles
from .int8 import QUANTIZE_ROWS, Int8WeightOnlyLinear

FORMATS = (False, "int8", "int4")


def check_format(option: str, fmt) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{option}={fmt!r} is not one of {FORMATS}")


def quantized_linear(fmt: str, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> nn.Module:
    """An int8 (per output row) or int4 (group-wise, asymmetric, round to nearest) layer for weight (out, in),
    quantized `QUANTIZE_ROWS` output rows at a time."""
    if fmt == "int8":
        return Int8WeightOnlyLinear.from_weight(weight, bias)
    w = weight.detach()
    parts = [quantize_rtn(w[a:a + QUANTIZE_ROWS], group_size) for a in range(0, w.shape[0], QUANTIZE_ROWS)]
    q, s, z = (torch.cat(p) for p in zip(*parts))
    return Int4WeightOnlyLinear.from_unpacked(q, s, z, group_size, bias=bias, dtype=w.dtype)


def empty_quantized_linear(fmt: str, in_features: int, out_features: int, bias: bool, group_size: int,
                           dtype: torch.dtype, device="meta") -> nn.Module:
    """The layer `quantized_linear` makes, unfilled (for loading a checkpoint into)."""
    if fmt == "int8":
        return Int8WeightOnlyLinear(in_features, out_features, bias, dtype, device)
    return Int4WeightOnlyLinear(in_features, out_features, group_size, bias, dtype, device)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding over a quantized (num_embeddings, embedding_dim) table: `table` is an Int8WeightOnlyLinear or an
    Int4WeightOnlyLinear (so a tied LM head can be that very module). forward(ids (...)) -> (..., embedding_dim) in
    the table's activation dtype: each looked-up row dequantized in fp32 and rounded once."""

    def __init__(self, table: Int8WeightOnlyLinear | Int4WeightOnlyLinear, padding_idx: int | None = None):
        super().__init__()
        if table.bias is not None:
            raise ValueError("an embedding table has no bias")
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, group_size: int = 128) -> "QuantizedEmbedding":
        check_format("embedding", fmt)
        if not fmt:
            raise ValueError("QuantizedEmbedding needs a format: 'int8' or 'int4'")
        return cls(quantized_linear(fmt, emb.weight, None, group_size), emb.padding_idx)

    @property
    def format(self) -> str:
        return "int4" if isinstance(self.table, Int4WeightOnlyLinear) else "int8"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows it returns (the model's activation dtype)."""
        return self.table.dtype if isinstance(self.table, Int4WeightOnlyLinear) else self.table.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.table.scales.device

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized rows `ids` (1-D) -> (len(ids), embedding_dim)."""
        t, dtype = self.table, dtype or self.dtype
        if isinstance(t, Int4WeightOnlyLinear):
            q = unpack_nibbles(t.qweight.index_select(0, ids), self.embedding_dim)
            return dequantize(q, t.scales.index_select(0, ids), t.zeros.index_select(0, ids), t.group_size, dtype)
        w = t.weight_int8.index_select(0, ids).float() * t.scales.index_select(0, ids).float()[:, None]
        return w.to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.is_floating_point():
            raise ValueError(f"embedding lookup needs integer token ids, got {input_ids.dtype}")
        flat = input_ids.reshape(-1)
        # checked on the CPU (nn.Embedding's IndexError); elsewhere index_select's own check (no host sync per step)
        if flat.device.type == "cpu" and not torch.compiler.is_compiling() and flat.numel() and \
                (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range 0..{self.num_embeddings - 1} "
                             f"(got {int(flat.min())}..{int(flat.max())})")
        return self.rows(flat).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format} rows"


# ------------------------------------------------------------------------------------------- the vision tower
def vision_linears(model: nn.Module):
    """(parent, attribute, Linear) of the vision tower's linears but the patch embedding (a Conv3d on disk)."""
    visual = model.visual
    for name, parent in visual.named_modules():
        if name == "patch_embed":
            continue
        for attr, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                yield parent, attr, child


def vision_layer(layer: nn.Module) -> nn.Module:
    """Mark a quantized vision linear for its many-rows inputs (int8: dequantized tiles, not the int8 GEMM)."""
    if isinstance(layer, Int8WeightOnlyLinear):
        layer.dequantize_many_rows = True
    return layer
