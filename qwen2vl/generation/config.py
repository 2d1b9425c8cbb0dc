"""`GenerationConfig`: the generation options of a checkpoint (`generation_config.json`) and of one call.

Every option defaults to None ("unset"). `generate` resolves them with transformers' priority:
call arguments > a `generation_config=` object > `model.generation_config` > `DEFAULTS`.
Keys this project does not implement (e.g. `transformers_version`) are kept in `extra` and written back.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from ..configuration import hub_offline
from ..model.static_decode import COMPILE_MODES

GENERATION_CONFIG_NAME = "generation_config.json"

# Global defaults applied to options nobody set (transformers 5.24 `_get_default_generation_params`). An unset
# length (neither max_new_tokens nor max_length) means DEFAULT_NEW_TOKENS new tokens, as transformers does.
DEFAULT_NEW_TOKENS = 20
DEFAULTS: dict[str, Any] = {
    "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "repetition_penalty": 1.0, "num_return_sequences": 1, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "use_cache": True, "compile": False, "num_beams": 1, "length_penalty": 1.0,
    "early_stopping": False, "remove_invalid_values": False, "output_hidden_states": False,
    "output_attentions": False,
}

FIELDS = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
          "top_p", "min_p", "repetition_penalty", "num_return_sequences", "pad_token_id", "bos_token_id",
          "eos_token_id", "stop_strings", "output_scores", "output_logits", "return_dict_in_generate",
          "use_cache", "compile", "num_beams", "length_penalty", "early_stopping", "bad_words_ids",
          "remove_invalid_values", "output_hidden_states", "output_attentions")
# `compile`: False, True (torch.compile mode "reduce-overhead": CUDA graphs on CUDA) or a torch.compile mode name;
# decoding then runs through the model's `static_decoding` (static shapes, no rows dropped).


class GenerationConfig:
    """Options of `generate`; see `FIELDS`. Unset options are None (resolved by `generate`)."""

    def __init__(self, **kwargs: Any):
        for name in FIELDS:
            setattr(self, name, copy.deepcopy(kwargs.pop(name, None)))
        self.extra: dict[str, Any] = {k: copy.deepcopy(v) for k, v in kwargs.items() if not k.startswith("_")}

    # ------------------------------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "GenerationConfig":
        if not isinstance(config_dict, dict):
            raise ValueError(f"GenerationConfig.from_dict expects a dict, got {type(config_dict).__name__}")
        return cls(**{**config_dict, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        out = {name: copy.deepcopy(getattr(self, name)) for name in FIELDS if getattr(self, name) is not None}
        out.update(copy.deepcopy(self.extra))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GenerationConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        config_file_name: str = GENERATION_CONFIG_NAME, revision: str | None = None,
                        **kwargs: Any) -> "GenerationConfig":
        """From a directory holding `generation_config.json`, a json file, or a hub repo id."""
        p = Path(pretrained_model_name_or_path).expanduser()
        if p.is_dir():
            if not (p / config_file_name).is_file():
                raise ValueError(f"no {config_file_name} in directory {p}")
            p = p / config_file_name
        elif not p.is_file():
            try:
                from huggingface_hub import hf_hub_download

                p = Path(hf_hub_download(str(pretrained_model_name_or_path), config_file_name, revision=revision,
                                         local_files_only=hub_offline()))
            except Exception as e:  # offline, unknown repo, network error, ...
                raise ValueError(f"could not load {config_file_name} for {str(pretrained_model_name_or_path)!r}: "
                                 f"not a local path and the hub could not provide it ({type(e).__name__}: {e})"
                                 ) from None
        config = cls.from_json_file(p)
        config.update(**kwargs)
        return config

    @classmethod
    def from_model_config(cls, model_config: Any) -> "GenerationConfig":
        """Token ids (bos/eos/pad) of a model config (its text config when nested); everything else unset."""
        text = getattr(model_config, "text_config", model_config)
        ids = {}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(model_config, name, None)
            ids[name] = value if value is not None else getattr(text, name, None)
        return cls(**ids)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, model_config: Any = None) -> "GenerationConfig":
        """The checkpoint's `generation_config.json` when the folder has one, else `from_model_config`."""
        path = Path(model_dir) / GENERATION_CONFIG_NAME
        if path.is_file():
            return cls.from_json_file(path)
        if model_config is None:
            return cls()
        return cls.from_model_config(model_config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / GENERATION_CONFIG_NAME
        out.write_text(self.to_json_string(), encoding="utf-8")
        return out

    # ------------------------------------------------------------------------------------------ merging
    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given known options; returns the unknown ones (not applied)."""
        unused = {}
        for k, v in kwargs.items():
            if k in FIELDS:
                setattr(self, k, copy.deepcopy(v))
            else:
                unused[k] = v
        return unused

    def merged(self, *overrides: "GenerationConfig | dict | None") -> "GenerationConfig":
        """A copy of self where each override's set (non-None) options win, later overrides winning last;
        options still unset afterwards take `DEFAULTS`."""
        out = copy.deepcopy(self)
        for o in overrides:
            if o is None:
                continue
            values = o if isinstance(o, dict) else {n: getattr(o, n) for n in FIELDS}
            out.update(**{k: v for k, v in values.items() if v is not None})
        for k, v in DEFAULTS.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        return out

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(e)] if isinstance(e, int) else [int(x) for x in e]

    def validate(self) -> None:
        """Raise ValueError for option values `generate` cannot honour (call on a `merged` config)."""
        def bad(msg):
            raise ValueError(f"Invalid generation option: {msg}")

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0):
            bad(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if self.min_new_tokens is not None and (not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0):
            bad(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 0):
            bad(f"max_length must be an int >= 0, got {self.max_length!r}")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            bad(f"num_return_sequences must be an int >= 1, got {self.num_return_sequences!r}")
        if self.repetition_penalty is None or not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(e, int) or e < 0 for e in self.eos_token_ids):
            bad(f"eos_token_id must be an int or a list of ints >= 0, got {self.eos_token_id!r}")
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, int) or self.pad_token_id < 0):
            bad(f"pad_token_id must be an int >= 0, got {self.pad_token_id!r}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad(f"num_return_sequences ({self.num_return_sequences}) has to be smaller or equal to num_beams "
                f"({self.num_beams})")
        if self.early_stopping not in (True, False, "never"):
            bad(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            bad(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.bad_words_ids is not None and not (
                isinstance(self.bad_words_ids, (list, tuple)) and self.bad_words_ids and all(
                    isinstance(w, (list, tuple)) and w and all(isinstance(t, int) and t >= 0 for t in w)
                    for w in self.bad_words_ids)):
            bad(f"bad_words_ids must be a non-empty list of non-empty lists of token ids >= 0, "
                f"got {self.bad_words_ids!r}")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            bad(f"compile must be True, False or one of {COMPILE_MODES}, got {self.compile!r}")
        if self.stop_strings is not None:
            strings = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
            if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
                bad(f"stop_strings must be a non-empty string or a list of them, got {self.stop_strings!r}")
        if not self.do_sample:
            return
        if self.temperature is None or not self.temperature > 0:
            bad(f"temperature must be > 0 when do_sample=True, got {self.temperature!r} "
                "(use do_sample=False for greedy decoding)")
        if self.top_k is None or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_p is None or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"
