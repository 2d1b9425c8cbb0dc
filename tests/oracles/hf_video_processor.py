"""Runs transformers' Qwen2VLVideoProcessor (the reference) on the cases of a JSON request; runs INSIDE the oracle
venv (torch 2.14.1 + torchvision + transformers 5.24, see .ci/oracle_venv.sh), never imports qwen2vl.

Usage: python hf_video_processor.py REQUEST.json OUT_DIR. Each case {"name", "source": "array"|"file", "path",
"fps"|"num_frames" (optional), "video_fps", "processor": {kwargs}} writes OUT_DIR/<name>.npz with indices (the
sampled frame indices; all frames when nothing is sampled), pixel_values_videos and video_grid_thw.
"""
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata, load_video


def run(case: dict) -> dict:
    proc = Qwen2VLVideoProcessor(**case.get("processor", {}))
    sampling = {k: case[k] for k in ("fps", "num_frames") if case.get(k) is not None}
    if case["source"] == "file":  # the reference's PyAV decoder, sampling through the processor's sample_frames
        frames, meta = load_video(case["path"], backend="pyav",
                                  sample_indices_fn=partial(proc.sample_frames, **sampling) if sampling else None)
        indices = np.asarray(meta.frames_indices)
        out = proc(videos=[frames], do_sample_frames=False, return_tensors="pt")
    else:
        frames = np.load(case["path"])
        meta = VideoMetadata(total_num_frames=len(frames), fps=case["video_fps"])
        indices = (proc.sample_frames(meta, **sampling).numpy() if sampling else np.arange(len(frames)))
        out = proc(videos=[frames], do_sample_frames=bool(sampling), video_metadata=[meta], return_tensors="pt",
                   **sampling)
    return {"indices": indices.astype(np.int64), "pixel_values_videos": out["pixel_values_videos"].numpy(),
            "video_grid_thw": out["video_grid_thw"].numpy()}


def main() -> None:
    request, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    torch.set_num_threads(1)
    for case in request["cases"]:
        np.savez(out_dir / f"{case['name']}.npz", **run(case))
    print("transformers", __import__("transformers").__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
