"""Where the real checkpoint metadata lives: `../shared` beside the repository (as CI lays it out)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if p.is_dir()), ROOT.parent / "shared")
QWEN2VL = SHARED / "qwen2-vl"
QWEN2VL_2B = QWEN2VL / "Qwen2-VL-2B-Instruct"
