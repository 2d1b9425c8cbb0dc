"""Image preprocessing speed: qwen2vl's torch and PIL image processors vs the transformers oracle, in one run.

Per image size, each processor is called on the same random RGB PIL image (the hub's default pixel budget,
min_pixels=3136 / max_pixels=12845056, unless overridden) with `return_tensors="pt"`. Calls are interleaved
(one call of each processor per round) so load drift on a shared machine hits all of them alike; the table shows
the median and minimum over --repeats rounds after a warm-up, and each median's ratio to the oracle PIL
processor (< 1 = faster). The oracle's torch processor (`Qwen2VLImageProcessor`, torchvision backend) is
included when torchvision is importable. Issue #7 target: our torch processor no slower than the oracle's.

    python benchmarks/bench_preprocess.py                       # 1920x1080 and 640x480, 15 rounds
    python benchmarks/bench_preprocess.py --sizes 1920x1080 --repeats 31 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2vl.processing import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil  # noqa: E402

HUB_MIN_PIXELS, HUB_MAX_PIXELS = 3136, 12845056


def processors(min_pixels: int, max_pixels: int) -> dict:
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    procs = {"qwen2vl torch": Qwen2VLImageProcessor(size=size), "qwen2vl pil": Qwen2VLImageProcessorPil(size=size)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: no oracle to compare with.")
            return procs
        procs["oracle pil"] = transformers.Qwen2VLImageProcessorPil(size=size)
        try:
            import torchvision  # noqa: F401

            procs["oracle torch"] = transformers.Qwen2VLImageProcessor(size=size)
        except Exception as e:  # torchvision missing or broken beside this torch
            print(f"(oracle torch processor unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]})")
    return procs


def bench(procs: dict, image: Image.Image, repeats: int) -> dict[str, list[float]]:
    for proc in procs.values():  # warm-up (allocations, caches, lazy imports)
        proc(image, return_tensors="pt")
    times: dict[str, list[float]] = {name: [] for name in procs}
    for _ in range(repeats):
        for name, proc in procs.items():
            start = time.perf_counter()
            proc(image, return_tensors="pt")
            times[name].append(time.perf_counter() - start)
    return times


def check_agreement(procs: dict, image: Image.Image) -> str:
    if "oracle pil" not in procs:
        return ""
    ref = procs["oracle pil"](image, return_tensors="pt")["pixel_values"]
    pil = procs["qwen2vl pil"](image, return_tensors="pt")["pixel_values"]
    tch = procs["qwen2vl torch"](image, return_tensors="pt")["pixel_values"]
    return (f"  pil == oracle pil: {torch.equal(pil, ref)}; torch vs oracle pil: max |diff| "
            f"{(tch - ref).abs().max().item():.3g}, mean {(tch - ref).abs().mean().item():.2g} (random noise image)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1920x1080,640x480", help="comma-separated WIDTHxHEIGHT list")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--min-pixels", type=int, default=HUB_MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=HUB_MAX_PIXELS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    procs = processors(args.min_pixels, args.max_pixels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians (min) over {args.repeats} "
          f"interleaved rounds; ratio = median / oracle pil median")
    for spec in args.sizes.split(","):
        w, h = (int(v) for v in spec.lower().split("x"))
        image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (h, w, 3), dtype=np.uint8))
        times = bench(procs, image, args.repeats)
        base = statistics.median(times["oracle pil"]) if "oracle pil" in times else None
        grid = procs["qwen2vl torch"](image)["image_grid_thw"][0].tolist()
        print(f"\n{w}x{h} -> grid {grid}")
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = f"  ratio {med / base:5.2f}" if base else ""
            print(f"  {name:14s} {med * 1e3:8.1f} ms  (min {min(ts) * 1e3:6.1f}){ratio}")
        print(check_agreement(procs, image))


if __name__ == "__main__":
    main()
