"""Where a model's files are: the bundled demo model's name, local folders, hub repo ids (downloaded), and the
safetensors files (one file, or the shards an index names) of a model folder."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .configuration import hub_offline

DEMO_MODEL_NAME = "qwen2vl-demo"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def demo_model_path() -> Path:
    return Path(__file__).parent / "demo" / "model"


def resolve_name(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """Map the bundled demo model's name to its folder; everything else is returned unchanged."""
    if str(name_or_path) == DEMO_MODEL_NAME:
        path = demo_model_path()
        if not (path / "config.json").exists():
            raise ValueError(f"The bundled demo model is missing from {path}; reinstall qwen2vl.")
        return path
    return name_or_path


def resolve_model_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id downloaded (config/json/safetensors/tokenizer files only)."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_hub_id)
    if p.exists():
        raise ValueError(f"{name!r} is a file; expected a model directory or a hub repo id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"model directory {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                      local_files_only=hub_offline()))
    except Exception as e:  # offline, unknown repo, network error, ...
        raise ValueError(
            f"could not resolve model {name!r}: not a local directory and the Hugging Face Hub could not provide it "
            f"({type(e).__name__}: {e}). If you are offline (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}), download the model first or pass a local directory."
        ) from None


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory (single file or the shards named by the index)."""
    d = Path(model_dir)
    index = d / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names shard files that do not exist in {d}: {absent}")
        return files
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    found = sorted(f.name for f in d.iterdir()) if d.is_dir() else []
    raise ValueError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {d} (found: {found[:20]})")
