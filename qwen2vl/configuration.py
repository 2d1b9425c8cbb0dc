"""Qwen2-VL configuration classes (plain Python; no transformers dependency).

Reads both the flat hub ``config.json`` (text fields at top level, ``rope_scaling: {type: mrope, ...}``,
``vision_config`` with ``in_chans``/``spatial_patch_size``) and the nested ``text_config``/``vision_config``
format written by transformers 5.x ``save_pretrained``. ``to_dict`` writes the nested format.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# Keys written by other tools that carry no meaning for the model; dropped on load.
_DROP_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "attn_implementation",
              "_attn_implementation", "_attn_implementation_autoset"}


def _dtype_str(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value)
    return s[len("torch."):] if s.startswith("torch.") else s


def _check_positive(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {v!r}")


class _ConfigBase:
    """Shared plumbing: declared fields with defaults, unknown keys kept as extras."""

    model_type = ""
    _defaults: dict[str, Any] = {}
    _aliases: dict[str, str] = {}   # alternative input key -> field name (alias not written back)

    def _init_fields(self, kwargs: dict[str, Any]) -> None:
        for alias, field in self._aliases.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                kwargs.setdefault(field, value)   # the canonical key wins when both are given
        kwargs.pop("model_type", None)
        for k in _DROP_KEYS:
            kwargs.pop(k, None)
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        self._extra_keys: list[str] = []
        for k, v in kwargs.items():
            if isinstance(getattr(type(self), k, None), property):
                continue             # read-only derived value (e.g. head_dim): validated by caller
            setattr(self, k, copy.deepcopy(v))
            self._extra_keys.append(k)

    def to_dict(self) -> dict[str, Any]:
        out = {name: copy.deepcopy(getattr(self, name)) for name in self._defaults}
        out.update({k: copy.deepcopy(getattr(self, k)) for k in self._extra_keys})
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        if not isinstance(config_dict, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(config_dict).__name__}")
        return cls(**{**config_dict, **kwargs})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict() and \
            getattr(self, "attn_implementation", None) == getattr(other, "attn_implementation", None)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # Whether a model with this config is an encoder-decoder (transformers code and PEFT ask).
    is_encoder_decoder = False
    _sub_config_key = ""   # where a composite qwen2_vl config.json holds this config ("text_config", ...)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None):
        """The decoder's config: `text_config` of the composite config, the config itself otherwise."""
        return getattr(self, "text_config", self)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        path = Path(save_directory)
        if path.exists() and not path.is_dir():
            raise ValueError(f"save_pretrained expects a directory, {path} is a file")
        path.mkdir(parents=True, exist_ok=True)
        out = path / CONFIG_NAME
        out.write_text(self.to_json_string(), encoding="utf-8")
        return out

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike, **kwargs: Any):
        try:
            data = json.loads(Path(json_file).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON: {e}") from None
        mt = data.get("model_type")
        if cls._sub_config_key and mt == "qwen2_vl" and cls._sub_config_key in data:
            data = data[cls._sub_config_key]   # e.g. the text config out of a full model's config.json
            mt = data.get("model_type")
        if mt is not None and mt not in (cls.model_type, ""):
            raise ValueError(f"{json_file}: model_type {mt!r} is not a Qwen2-VL config of this kind "
                             f"({cls.__name__}, expected {cls.model_type!r})")
        return cls.from_dict(data, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None,
                        **kwargs: Any):
        """Load from a directory holding config.json, a json file path, or a hub repo id."""
        return cls.from_json_file(resolve_config_file(pretrained_model_name_or_path, revision), **kwargs)


class Qwen2VLVisionConfig(_ConfigBase):
    """Vision tower config. ``hidden_size`` is the PatchMerger output (= LLM width), ``embed_dim`` the ViT width."""

    model_type = "qwen2_vl_vision"
    _sub_config_key = "vision_config"
    _defaults = {
        "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
        "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "initializer_range": 0.02, "rope_parameters": None,
    }
    _aliases = {"in_chans": "in_channels", "spatial_patch_size": "patch_size",
                "num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    def __init__(self, **kwargs: Any) -> None:
        self._init_fields(kwargs)
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_theta": 10000.0, "rope_type": "axial"}
        _check_positive(self, ("depth", "embed_dim", "hidden_size", "num_heads", "in_channels", "patch_size",
                               "spatial_merge_size", "temporal_patch_size"))
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise ValueError(f"Qwen2VLVisionConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"vision embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 4 != 0:
            raise ValueError(f"vision head_dim (embed_dim/num_heads = {self.head_dim}) must be divisible by 4 "
                             "for the 2-D rotary embedding")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.depth

    @property
    def spatial_patch_size(self) -> int:
        return self.patch_size

    @property
    def in_chans(self) -> int:
        return self.in_channels


class Qwen2VLTextConfig(_ConfigBase):
    """Qwen2 decoder config with M-RoPE (``mrope_section`` over head_dim/2 frequencies)."""

    model_type = "qwen2_vl_text"
    _sub_config_key = "text_config"
    _defaults = {
        "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-5, "use_cache": True,
        "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 80, "layer_types": None,
        "attention_dropout": 0.0, "rope_parameters": None, "bos_token_id": 151643, "eos_token_id": 151645,
        "pad_token_id": None, "dtype": None, "tie_word_embeddings": False,
    }
    _aliases = {"torch_dtype": "dtype"}

    def __init__(self, **kwargs: Any) -> None:
        rope_scaling = kwargs.pop("rope_scaling", None)
        rope_theta = kwargs.pop("rope_theta", None)
        head_dim = kwargs.pop("head_dim", None)
        mrope_section = kwargs.pop("mrope_section", None)
        self._init_fields(kwargs)
        self.dtype = _dtype_str(self.dtype)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # legacy `rope_scaling` wins over `rope_parameters`; "mrope" is a position layout, not a rope type
        rope = copy.deepcopy(rope_scaling or self.rope_parameters or {})
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters/rope_scaling must be a dict, got {type(rope).__name__}")
        rope.setdefault("rope_theta", 1e6 if rope_theta is None else float(rope_theta))
        if rope.get("rope_type", rope.get("type")) == "mrope":
            rope["rope_type"] = "default"
        rope.setdefault("rope_type", rope.get("type", "default"))
        if mrope_section is not None:
            rope["mrope_section"] = list(mrope_section)
        rope.setdefault("mrope_section", [16, 24, 24])
        self.rope_parameters = rope
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention" for i in range(self.num_hidden_layers)]
        self._validate(head_dim)

    def _validate(self, head_dim: Any) -> None:
        _check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"text hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if head_dim is not None and head_dim != self.head_dim:
            raise ValueError(f"head_dim={head_dim} is not supported: Qwen2-VL uses hidden_size/num_attention_heads "
                             f"= {self.head_dim}")
        sec = self.mrope_section
        if (not isinstance(sec, (list, tuple)) or len(sec) != 3
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sec)):
            raise ValueError(f"mrope_section must be a list of 3 non-negative ints (t, h, w), got {sec!r}")
        if sum(sec) * 2 != self.head_dim:
            raise ValueError(f"sum(mrope_section) = {sum(sec)} (mrope_section={list(sec)}) must equal head_dim/2 = "
                             f"{self.head_dim / 2} (head_dim = hidden_size/num_attention_heads = {self.head_dim})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                             f"{self.num_hidden_layers}")
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        return self.rope_parameters["mrope_section"]

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def rope_scaling(self) -> dict[str, Any]:
        """Legacy name of ``rope_parameters`` (same dict)."""
        return self.rope_parameters

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tie_word_embeddings")   # lives on the top-level config
        return out


class Qwen2VLConfig(_ConfigBase):
    """Top-level config: ``text_config`` + ``vision_config`` + special token ids."""

    model_type = "qwen2_vl"
    _defaults = {
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False, "architectures": None,
    }

    def __init__(self, text_config: Any = None, vision_config: Any = None, **kwargs: Any) -> None:
        attn = kwargs.pop("attn_implementation", None) or kwargs.pop("_attn_implementation", None) or "sdpa"
        dtype = kwargs.pop("torch_dtype", None)
        dtype = _dtype_str(kwargs.pop("dtype", None) if dtype is None else dtype)
        kwargs.pop("dtype", None)
        if text_config is None:   # flat hub format: text fields live at the top level
            text_keys = set(Qwen2VLTextConfig._defaults) | {"rope_scaling", "rope_theta", "head_dim",
                                                             "mrope_section"}
            text_keys.discard("tie_word_embeddings")
            text_keys.discard("dtype")
            text_config = {k: kwargs.pop(k) for k in list(kwargs) if k in text_keys}
            text_config["dtype"] = dtype
        if isinstance(text_config, dict):
            text_config = Qwen2VLTextConfig(**text_config)
        if vision_config is None:
            vision_config = {}
        if isinstance(vision_config, dict):
            vision_config = Qwen2VLVisionConfig(**vision_config)
        if not isinstance(text_config, Qwen2VLTextConfig):
            raise ValueError(f"text_config must be a dict or Qwen2VLTextConfig, got {type(text_config).__name__}")
        if not isinstance(vision_config, Qwen2VLVisionConfig):
            raise ValueError(f"vision_config must be a dict or Qwen2VLVisionConfig, got "
                             f"{type(vision_config).__name__}")
        self.text_config = text_config
        self.vision_config = vision_config
        self._init_fields(kwargs)
        self.tie_word_embeddings = bool(self.tie_word_embeddings or text_config.tie_word_embeddings)
        text_config.tie_word_embeddings = self.tie_word_embeddings
        self.dtype = dtype if dtype is not None else text_config.dtype
        if text_config.dtype is None:
            text_config.dtype = self.dtype
        self.attn_implementation = attn

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        if value not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {value!r}")
        self._attn_implementation = value

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("architectures") is None:
            out.pop("architectures")
        out["dtype"] = self.dtype
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set in the environment now (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_config_file(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """Local dir/file, or download ``config.json`` of a hub repo id (ValueError when unreachable)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / CONFIG_NAME).is_file():
            raise ValueError(f"no {CONFIG_NAME} in directory {p}")
        return p / CONFIG_NAME
    if p.is_file():
        return p
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ValueError(f"{name!r} is not an existing file or directory")
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(name, CONFIG_NAME, revision=revision, local_files_only=hub_offline()))
    except Exception as e:  # offline, unknown repo, network error, ...
        raise ValueError(
            f"could not load {CONFIG_NAME} for {name!r}: not a local path and the Hugging Face Hub could not "
            f"provide it ({type(e).__name__}: {e}). If you are offline (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}), download the model first or pass a local "
            "directory.") from None


__all__ = ["Qwen2VLConfig", "Qwen2VLTextConfig", "Qwen2VLVisionConfig", "CONFIG_NAME"]
