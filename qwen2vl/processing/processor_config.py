"""Options and config files of the image and video processors: `ProcessorConfigMixin` (defaults, per-call
overrides, `size` as the one source of `min_pixels` / `max_pixels`, preprocessor_config.json load / save) and
`resolve_config_file` (a local folder or a hub repo's file)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys that describe a config file rather than a processing option; accepted and dropped by `from_dict`.
_METADATA_KEYS = {"image_processor_type", "video_processor_type", "processor_class", "_processor_class",
                  "auto_map", "feature_extractor_type"}


def resolve_size(size: dict | None, min_pixels: int | None = None, max_pixels: int | None = None,
                 fallback: dict | None = None) -> dict:
    """Normalise `size` to {"shortest_edge", "longest_edge"} (pixel counts); legacy min/max_pixels keys accepted.

    Explicit `min_pixels`/`max_pixels` win over `size`; keys missing from `size` come from `fallback`.
    """
    if size is not None and not isinstance(size, dict):
        raise ValueError(f"size must be a dict with 'shortest_edge'/'longest_edge' pixel counts, got {size!r}.")
    s = dict(size or {})
    if "min_pixels" in s:
        s["shortest_edge"] = s.pop("min_pixels")
    if "max_pixels" in s:
        s["longest_edge"] = s.pop("max_pixels")
    unknown = set(s) - {"shortest_edge", "longest_edge"}
    if unknown:
        raise ValueError(f"size has unsupported keys {sorted(unknown)}; use 'shortest_edge'/'longest_edge' "
                         "(minimum/maximum pixel counts).")
    if min_pixels is not None:
        s["shortest_edge"] = min_pixels
    if max_pixels is not None:
        s["longest_edge"] = max_pixels
    for key in ("shortest_edge", "longest_edge"):
        if s.get(key) is None and fallback is not None:
            s[key] = fallback[key]
        if not isinstance(s.get(key), (int, float)) or s[key] <= 0:
            raise ValueError(f"size[{key!r}] (a pixel count) must be a positive number, got {s.get(key)!r}.")
    if s["shortest_edge"] > s["longest_edge"]:
        raise ValueError(f"min_pixels ({s['shortest_edge']}) must not exceed max_pixels ({s['longest_edge']}).")
    return {"shortest_edge": s["shortest_edge"], "longest_edge": s["longest_edge"]}


def resolve_config_file(name_or_path: str | os.PathLike, filename: str, *, required: bool = True,
                        **hub_kwargs: Any) -> str | None:
    """Local directory or Hub repo id -> path of `filename`; None when optional and absent."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return str(candidate)
        if required:
            raise ValueError(f"{filename} not found in directory {str(path)!r}.")
        return None
    s = str(name_or_path)
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise ValueError(f"Directory {s!r} does not exist (and it is not a Hub repo id like 'org/name').")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(s, filename, **{k: v for k, v in hub_kwargs.items() if v is not None})
    except LocalEntryNotFoundError as e:
        if not required:
            return None
        raise ValueError(
            f"{s!r} is not a local directory, and {filename} for Hub repo {s!r} is not in the local cache while "
            f"downloads are disabled (HF_HUB_OFFLINE=1 / local_files_only) or unreachable. Pass a local "
            f"directory instead. ({e})") from e
    except EntryNotFoundError:
        if not required:
            return None
        raise ValueError(f"Hub repo {s!r} has no {filename}.") from None
    except Exception as e:  # network errors, missing repos, auth
        raise ValueError(f"{s!r} is not a local directory, and downloading {filename} from the Hub failed "
                         f"({type(e).__name__}: {e}). "
                         "If you are offline set HF_HUB_OFFLINE=1 and use a cached or local copy.") from e


class SizeBound:
    """`min_pixels` / `max_pixels` (transformers' names) as views of `size["shortest_edge"]` / `size["longest_edge"]`:
    reading gives the bound, assigning re-resolves `size` through `resolve_size` (which validates it)."""

    def __init__(self, key: str):
        self.key = key

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name  # the resolve_size keyword: "min_pixels" / "max_pixels"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj.size[self.key]

    def __set__(self, obj: Any, value: int) -> None:
        obj.size = resolve_size(obj.size, **{self.name: value})


class ProcessorConfigMixin:
    """Option storage, per-call overrides and (de)serialisation shared by the image and video processors."""

    config_name = "preprocessor_config.json"
    type_key = "image_processor_type"
    saved_type = "Qwen2VLImageProcessor"
    default_size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    defaults: dict[str, Any] = dict(
        do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
        patch_size=14, temporal_patch_size=2, merge_size=2)
    call_only_keys: tuple[str, ...] = ("return_tensors", "input_data_format", "device", "media_limits")
    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, *, size: dict | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 **kwargs: Any):
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}.")
        for key, default in self.defaults.items():
            value = kwargs.get(key)
            setattr(self, key, default if value is None else value)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.size = resolve_size(size, min_pixels, max_pixels, fallback=self.default_size)

    min_pixels = SizeBound("shortest_edge")
    max_pixels = SizeBound("longest_edge")

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Merge per-call keyword arguments (None = use the instance value) into one resolved option dict."""
        allowed = set(self.defaults) | {"size", "min_pixels", "max_pixels"} | set(self.call_only_keys)
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(f"{type(self).__name__}: unexpected keyword argument(s) {sorted(unknown)}.")
        opts = {k: (getattr(self, k) if overrides.get(k) is None else overrides[k]) for k in self.defaults}
        opts["size"] = resolve_size(overrides.get("size"), overrides.get("min_pixels"), overrides.get("max_pixels"),
                                    fallback=self.size)
        for key in self.call_only_keys:
            opts[key] = overrides.get(key)
        return opts

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.defaults}
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        out["resample"] = int(self.resample)
        # min/max_pixels duplicate `size` so that 4.x-era loaders (which read only these keys) agree.
        out.update(size=dict(self.size), min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        out[self.type_key] = self.saved_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        os.makedirs(save_directory, exist_ok=True)
        path = Path(save_directory) / self.config_name
        self.to_json_file(path)
        return [str(path)]

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike):
        try:
            return cls.from_dict(json.loads(Path(json_file).read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON: {e}") from None

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any):
        known = set(cls.defaults) | {"size", "min_pixels", "max_pixels"}
        kwargs = {k: v for k, v in config.items() if k in known}
        ignored = set(config) - known - _METADATA_KEYS
        if ignored:
            warnings.warn(f"{cls.__name__}: ignoring unsupported config keys {sorted(ignored)}.", stacklevel=2)
        kwargs.update(overrides)  # unknown overrides are rejected by __init__
        if overrides.get("size") is not None:  # an explicit size replaces the file's min/max_pixels
            for key in ("min_pixels", "max_pixels"):
                if key not in overrides:
                    kwargs.pop(key, None)
        return cls(**kwargs)

    @classmethod
    def _load_config(cls, name_or_path: str | os.PathLike, hub_kwargs: dict) -> dict[str, Any]:
        return json.loads(Path(resolve_config_file(name_or_path, cls.config_name, **hub_kwargs)).read_text())

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, **overrides: Any):
        """Build from a directory or Hub repo id holding the config file; keyword overrides win over the file."""
        hub_kwargs = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        return cls.from_dict(cls._load_config(name_or_path, hub_kwargs), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
