"""Loading the published 4-bit checkpoint formats (AutoAWQ "gemm", AutoGPTQ / GPTQModel) into `Int4WeightOnlyLinear`.

Which variants load (``quantization_config`` in config.json; anything else is a ValueError naming the field):

* **AWQ** — ``quant_method: "awq"``, ``version`` (or ``format``) ``"gemm"``, ``bits: 4``, ``zero_point: true``,
  ``backend`` absent or ``"autoawq"``, ``group_size`` dividing in_features (128 in the hub's Qwen2-VL repos).
  Per layer: ``qweight`` int32 (in, out/8), ``qzeros`` int32 (in/group, out/8), ``scales`` (in/group, out), both
  packed along the output dim with AutoAWQ's nibble order: nibble ``i`` (bits 4i..4i+3) of word ``c`` holds
  output column ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``. W[o, i] = (q - z) * s.
* **GPTQ** — ``quant_method: "gptq"``, ``bits: 4``, ``checkpoint_format`` (or ``format``) absent / ``"gptq"``
  (v1: zero points stored minus one) with ``sym: true``, or ``"gptq_v2"`` (zero points as is) with ``sym``
  true or false; ``desc_act`` true or false (``g_idx`` gives each input's group); ``group_size`` -1 (one group)
  or a positive size; ``pack_dtype`` absent or ``"int32"``; no per-module ``dynamic`` overrides.
  Per layer: ``qweight`` int32 (in/8, out) packed along the input dim (input ``8r + j`` in nibble ``j`` of row
  ``r``), ``qzeros`` int32 (n_groups, out/8) packed along the output dim (nibble ``j`` → column ``8c + j``),
  ``scales`` (n_groups, out), ``g_idx`` int32 (in,) (optional: default ``i // group_size``).

A layer is quantized where the checkpoint holds ``<name>.qweight`` (the hub repos: the decoder's q/k/v/o and
gate/up/down projections, the vision tower and LM head in floating point; an untied quantized LM head, GPTQModel's
``lm_head: true``, loads too); it must be a linear layer of the model. Loading never makes a float copy of a quantized weight: the packed tensors are read into placeholders,
then each layer is unpacked to 4-bit codes and handed to `Int4WeightOnlyLinear.from_unpacked` one at a time.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open

from .checkpoint import checkpoint_files, checkpoint_to_model_key, model_kind
from .quantization import Int4WeightOnlyLinear
from .quantization.model import text_model
from .quantization.serialization import LOADERS, OWN_INT4

SUPPORTED = ("awq (version 'gemm', bits 4, zero_point true) and gptq (bits 4; checkpoint_format 'gptq' with "
             "sym true, or 'gptq_v2'; desc_act true or false; pack_dtype int32)")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # output column (within a word's 8) held by nibble i
_PACK = 8                                # 4-bit values per int32 word


@dataclass(frozen=True)
class QuantFormat:
    method: str          # "awq" | "gptq"
    group_size: int      # -1: one group over all inputs
    zero_offset: int     # added to the stored zero points (GPTQ v1 stores z - 1)


def _unsupported(qc: dict, why: str) -> ValueError:
    shown = {k: qc.get(k) for k in ("quant_method", "version", "format", "checkpoint_format", "bits", "sym",
                                     "zero_point", "backend", "pack_dtype") if k in qc}
    return ValueError(f"unsupported quantization_config {shown}: {why}. Loadable 4-bit checkpoints: {SUPPORTED}.")


def parse_quantization_config(qc: dict) -> QuantFormat:
    """The checkpoint format a hub ``quantization_config`` names; ValueError naming the field for anything else."""
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise _unsupported(qc, f"quant_method {qc.get('quant_method')!r} is not awq or gptq")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise _unsupported(qc, f"bits={bits!r}; only 4-bit weights load")
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise _unsupported(qc, f"group_size={group!r} must be -1 or a positive integer")
    if method == "awq":
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if version != "gemm":
            raise _unsupported(qc, f"AWQ version {version!r}: only the 'gemm' packing loads")
        if str(qc.get("backend", "autoawq")).lower() != "autoawq":
            raise _unsupported(qc, f"AWQ backend {qc.get('backend')!r}: only AutoAWQ's packing loads")
        if qc.get("zero_point", True) is not True:
            raise _unsupported(qc, "AWQ zero_point=false has no GEMM checkpoint layout")
        return QuantFormat("awq", group, 0)
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    sym = qc.get("sym", True)
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(qc, f"GPTQ checkpoint_format {fmt!r}: only 'gptq' and 'gptq_v2' load")
    if fmt == "gptq" and sym is not True:
        raise _unsupported(qc, "asymmetric (sym=false) GPTQ in the v1 'gptq' format stores zero points minus one "
                               "and overflows where a zero point is 0; re-save it as gptq_v2")
    if str(qc.get("pack_dtype", "int32")).lower().replace("torch.", "") != "int32":
        raise _unsupported(qc, f"pack_dtype {qc.get('pack_dtype')!r}: only int32 words load")
    if qc.get("dynamic"):
        raise _unsupported(qc, "per-module 'dynamic' overrides are not supported")
    return QuantFormat("gptq", group, 1 if fmt == "gptq" else 0)


# ----------------------------------------------------------------------------------------------- unpacking
def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 (...,) → (..., 8) uint8 values 0..15, nibble j = bits 4j..4j+3 of the word: read as the word's 4
    little-endian bytes (byte b holds nibbles 2b, 2b + 1), which is 4x less memory traffic than 32-bit shifts."""
    assert sys.byteorder == "little"
    b = words.contiguous().view(torch.uint8).view(*words.shape, 4)
    return torch.stack([b & 0xF, b >> 4], dim=-1).view(*words.shape, 8)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ GEMM tensors → (q (out, in) uint8, scales (out, n_groups), zeros (out, n_groups) uint8)."""
    column_of_nibble = torch.tensor(AWQ_ORDER, device=qweight.device)
    nibble_of_column = torch.argsort(column_of_nibble)          # inverse permutation: [0, 4, 1, 5, 2, 6, 3, 7]

    def columns(words):                                          # (rows, out/8) → (rows, out) in column order
        return _nibbles(words)[..., nibble_of_column].flatten(-2)

    return columns(qweight).t().contiguous(), scales.t().contiguous(), columns(qzeros).t().contiguous()


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, zero_offset: int):
    """GPTQ tensors → (q (out, in) uint8, scales (out, n_groups), zeros (out, n_groups) uint8)."""
    q = _nibbles(qweight).permute(1, 0, 2).reshape(qweight.shape[1], -1)   # (in/8, out, 8) → (out, in): 8r + j
    zeros = _nibbles(qzeros).flatten(-2).to(torch.int16) + zero_offset
    if int(zeros.max()) > 15:
        raise ValueError(f"GPTQ zero point {int(zeros.max())} is outside 0..15 (a v1 checkpoint with a zero "
                         "point of 0 overflowed when it was saved)")
    return q.contiguous(), scales.t().contiguous(), zeros.to(torch.uint8).t().contiguous()


# ----------------------------------------------------------------------------------------------- loading
class PackedInt4Linear(nn.Module):
    """Placeholder for a quantized linear while the checkpoint loads: its buffers are the checkpoint's packed
    tensors (names and shapes as stored), filled by `load_checkpoint_into`; `to_int4` then builds the real layer."""

    keep_dtype = ("scales",)   # read into fp32 whatever the stored float type (exact), not the model dtype

    def __init__(self, fmt: QuantFormat, name: str, in_features: int, out_features: int, bias: bool,
                 has_g_idx: bool):
        super().__init__()
        self.fmt, self.name = fmt, name
        self.in_features, self.out_features = in_features, out_features
        group = in_features if fmt.group_size == -1 else fmt.group_size
        if out_features % _PACK or (fmt.method == "gptq" and in_features % _PACK):
            raise ValueError(f"{name}: a {fmt.method} layer needs in/out features divisible by 8, got "
                             f"({out_features}, {in_features})")
        if fmt.method == "awq" and in_features % group:
            raise ValueError(f"{name}: AWQ group_size {group} does not divide in_features {in_features}")
        self.group = group
        n_groups = -(-in_features // group)
        if fmt.method == "awq":
            shapes = {"qweight": (in_features, out_features // _PACK)}
        else:
            shapes = {"qweight": (in_features // _PACK, out_features)}
        shapes.update(qzeros=(n_groups, out_features // _PACK), scales=(n_groups, out_features))
        if has_g_idx:
            shapes["g_idx"] = (in_features,)
        for key, shape in shapes.items():
            dtype = torch.float32 if key == "scales" else torch.int32
            self.register_buffer(key, torch.empty(shape, dtype=dtype, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def to_int4(self, dtype: torch.dtype) -> nn.Module:
        if self.fmt.method == "awq":
            q, scales, zeros = unpack_awq(self.qweight, self.qzeros, self.scales)
        else:
            q, scales, zeros = unpack_gptq(self.qweight, self.qzeros, self.scales, self.fmt.zero_offset)
        g_idx = self._g_idx()
        bias = None if self.bias is None else self.bias.detach()
        return Int4WeightOnlyLinear.from_unpacked(q, scales, zeros, self.group, g_idx=g_idx, bias=bias, dtype=dtype)

    def _g_idx(self) -> torch.Tensor | None:
        """The checkpoint's g_idx, or None where it is the plain i // group_size (so kernels can skip it)."""
        g = getattr(self, "g_idx", None)
        if g is None:
            return None
        n_groups = self.scales.shape[0]
        g = g.long()
        if int(g.min()) < 0 or int(g.max()) >= n_groups:
            raise ValueError(f"{self.name}.g_idx has groups outside 0..{n_groups - 1}")
        plain = torch.arange(self.in_features, device=g.device) // self.group
        if torch.equal(g, plain):
            return None
        return g


def checkpoint_keys(model_dir: str | os.PathLike) -> set[str]:
    keys: set[str] = set()
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            keys.update(sf.keys())
    return keys


def install_placeholders(model: nn.Module, model_dir: str | os.PathLike, fmt: QuantFormat) -> list[str]:
    """Replace each linear layer the checkpoint stores quantized (a ``.qweight`` key) by a `PackedInt4Linear` on
    the meta device, ready for `load_checkpoint_into`. Returns their module names."""
    keys = checkpoint_keys(model_dir)
    kind = model_kind(model)
    names = []
    for key in sorted(k for k in keys if k.endswith(".qweight")):
        prefix = key[: -len(".qweight")]
        name = checkpoint_to_model_key(prefix + ".weight", kind)[: -len(".weight")]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"the checkpoint stores {prefix!r} quantized ({key}), but it is not a linear layer of "
                             f"{type(model).__name__}")
        if name == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
            raise ValueError("the checkpoint quantizes lm_head but the config ties it to the input embedding "
                             "(tie_word_embeddings=true)")
        holder = PackedInt4Linear(fmt, name, mod.in_features, mod.out_features, mod.bias is not None,
                                  has_g_idx=f"{prefix}.g_idx" in keys)
        model.set_submodule(name, holder)
        names.append(name)
    if not names:
        raise ValueError(f"config.json names a {fmt.method} quantization_config but no tensor in {model_dir} is "
                         "quantized (no '*.qweight' key)")
    return names


def finish_quantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Unpack each `PackedInt4Linear` of a loaded model into an `Int4WeightOnlyLinear` (one layer at a time: the
    packed and unpacked copies of a single layer are the only extra memory). Off the CPU the layer is built on
    the CPU and then moved (the layer builder's index checks run there; a layer is small next to the model).
    Where every decoder projection became int4 with one group size, `model.quantization_config` becomes our own
    int4 format's, so `save_pretrained` writes the model in it (else saving it stays refused)."""
    names = [n for n, m in model.named_modules() if isinstance(m, PackedInt4Linear)]
    fmt = None
    with torch.no_grad():
        for name in names:
            holder = model.get_submodule(name)
            fmt, device = holder.fmt, holder.qweight.device
            if device.type != "cpu":
                holder = holder.to("cpu")
            model.set_submodule(name, holder.to_int4(dtype).to(device))
            del holder
    if fmt is not None:
        own = _own_int4_config(model, fmt)
        if own is not None:
            model.quantization_config = own


def _own_int4_config(model: nn.Module, fmt: QuantFormat) -> dict | None:
    """Our int4 format's quantization_config for `model`, None where that format cannot describe it (some decoder
    projections left in float, or several group sizes)."""
    proj = [c for layer in text_model(model).layers for parent in (layer.self_attn, layer.mlp)
            for c in parent.children() if isinstance(c, (nn.Linear, Int4WeightOnlyLinear))]
    int4 = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    head = isinstance(getattr(model, "lm_head", None), Int4WeightOnlyLinear)
    groups = {m.group_size for m in int4}
    if len(groups) != 1 or len(int4) != len(proj) + head or not all(isinstance(c, Int4WeightOnlyLinear) for c in proj):
        return None
    return {"quant_method": OWN_INT4, "bits": 4, "group_size": groups.pop(), "zero_point": True, "sym": False,
            "method": fmt.method, "lm_head": head, "modules_to_not_convert": ["visual"]}


def _prepare_hub_format(model: nn.Module, qcfg: dict, model_dir, dtype: torch.dtype) -> None:
    """`quantization.serialization.LOADERS` entry for "awq" / "gptq": placeholders before the weights are read
    (`finish_quantized` after)."""
    install_placeholders(model, model_dir, parse_quantization_config(qcfg))


def _register() -> None:
    LOADERS.update(awq=_prepare_hub_format, gptq=_prepare_hub_format)


_register()

__all__ = ["QuantFormat", "parse_quantization_config", "unpack_awq", "unpack_gptq", "PackedInt4Linear",
           "install_placeholders", "finish_quantized", "checkpoint_keys", "SUPPORTED", "AWQ_ORDER"]
