"""The video processor against the reference: transformers' Qwen2VLVideoProcessor, run in a separate oracle venv
(it needs torchvision, which needs another torch than the suite's; `.ci/oracle_venv.sh` builds the venv outside
the clone and `.ci/run` exports its interpreter as QWEN2VL_ORACLE_PYTHON). Same frames (an array, and a video
file both sides decode with PyAV), same fps / num_frames / pixel bounds → equal frame indices, video_grid_thw and
pixel_values_videos (max |diff| <= 1e-5 normalized units: our torch resize reproduces torchvision's bicubic
antialias; measured 0 on every case here).

Skipped (loudly) where the venv is absent, except in CI (CI=true), where a missing venv fails.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qwen2vl.processing.video_processing import Qwen2VLVideoProcessor, sample_frame_indices
from tiny import write_mp4

DEFAULT_VENV_PYTHON = Path.home() / ".cache" / "qwen2vl-ci" / "oracle-venv" / "bin" / "python"
ORACLE = Path(__file__).parent / "oracles" / "hf_video_processor.py"
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 40}


def oracle_python() -> str:
    python = Path(os.environ.get("QWEN2VL_ORACLE_PYTHON") or DEFAULT_VENV_PYTHON)
    if python.exists():
        return str(python)
    msg = (f"VIDEO ORACLE NOT RUN: no oracle venv at {python} (build it with .ci/oracle_venv.sh, or set "
           "QWEN2VL_ORACLE_PYTHON)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def frames(n, h, w, seed=0):
    """(F,H,W,3) uint8: smooth content plus noise, different per frame (resampling errors would show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.stack([127 + 100 * np.sin(x / (7 + c) + f * 0.4) * np.cos(y / (9 - c) - f * 0.2)
                               for c in range(3)], -1) for f in range(n)])
    return (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    python = oracle_python()
    root = tmp_path_factory.mktemp("video_oracle")
    clip = frames(20, 90, 120)
    np.save(root / "clip.npy", clip)
    np.save(root / "odd.npy", frames(9, 150, 200, seed=1))
    np.save(root / "odd_float.npy", frames(7, 150, 200, seed=3).astype(np.float32))  # the non-uint8 path
    write_mp4(root / "clip.mp4", frames(30, 48, 64, seed=2), fps=10)
    cases = [
        dict(name="fps", source="array", path=str(root / "clip.npy"), video_fps=10, fps=2, processor=PIXELS),
        dict(name="fps_above_min", source="array", path=str(root / "clip.npy"), video_fps=5, fps=1.5,
             processor=PIXELS),
        dict(name="num_frames", source="array", path=str(root / "clip.npy"), video_fps=10, num_frames=7,
             processor=PIXELS),
        dict(name="odd_all_frames_downscaled", source="array", path=str(root / "odd.npy"), video_fps=10,
             processor={"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 12}),
        dict(name="odd_float_frames", source="array", path=str(root / "odd_float.npy"), video_fps=10,
             processor={"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 12}),
        dict(name="file_fps", source="file", path=str(root / "clip.mp4"), video_fps=10, fps=4, processor=PIXELS),
    ]
    (root / "request.json").write_text(json.dumps({"cases": cases}))
    proc = subprocess.run([python, str(ORACLE), str(root / "request.json"), str(root)], capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {c["name"]: (c, dict(np.load(root / f"{c['name']}.npz"))) for c in cases}


@pytest.mark.parametrize("name", ["fps", "fps_above_min", "num_frames", "odd_all_frames_downscaled",
                                  "odd_float_frames", "file_fps"])
def test_video_processor_matches_transformers(reference, name):
    case, ref = reference[name]
    sampling = {k: case[k] for k in ("fps", "num_frames") if case.get(k) is not None}
    proc = Qwen2VLVideoProcessor(**case["processor"])
    if case["source"] == "file":
        out = proc(videos=case["path"], return_metadata=True, **sampling)
        indices = out["video_metadata"][0].frames_indices
    else:
        data = np.load(case["path"])
        meta = {"total_num_frames": len(data), "fps": case["video_fps"]}
        out = proc(videos=[data], video_metadata=[meta], **sampling)
        indices = (sample_frame_indices(len(data), case["video_fps"], **sampling) if sampling
                   else list(range(len(data))))
    assert list(indices) == ref["indices"].tolist()
    assert out["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    ours = out["pixel_values_videos"].numpy()
    assert ours.shape == ref["pixel_values_videos"].shape
    assert np.abs(ours - ref["pixel_values_videos"]).max() <= 1e-5
