"""The performance table of benchmarks/bench_all.py, on CUDA: qwen2vl (eager and `compile=True` decoding) vs
transformers in the same run, same random weights, bf16.

    python benchmarks/bench_gpu.py                      # real Qwen2-VL-2B shape
    python benchmarks/bench_gpu.py --config small       # a quick smoke run on a small shape

Rows: TTFT for a 1024x768 image, vision tower, decode b1 bf16 (eager / compiled vs transformers), decode
batch 8 (eager / compiled), int8 weight-only decode b1 (eager / compiled) vs transformers bf16. Each figure is
the median of --repeats runs (CUDA-synchronised); compile time is excluded (warm-up runs). Ratios > 1 mean
qwen2vl is faster. Without CUDA it prints one line and exits 0. Not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cuda_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hbm_bandwidth_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), 10)
    return 2 * x.numel() / t / 1e9


def section(name: str, fn) -> None:
    """Run one group of rows; a failure is printed and the remaining groups still run."""
    t = time.perf_counter()
    try:
        fn()
    except Exception:
        print(f"  section {name} failed:\n{traceback.format_exc()}", flush=True)
    print(f"  [{name}: {time.perf_counter() - t:.0f} s]", flush=True)


def to_cuda(inputs: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}


def gen(model, inputs, new_tokens: int, hf: bool, **kw):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              **({"pad_token_id": 0} if hf else {}), **kw)


def decode_tps(model, inputs, new_tokens, repeats, hf, **kw) -> float:
    gen(model, inputs, new_tokens + 1, hf, **kw)  # warm-up (and compilation / CUDA-graph capture)
    t1 = cuda_time(lambda: gen(model, inputs, 1, hf, **kw), repeats)
    tn = cuda_time(lambda: gen(model, inputs, new_tokens + 1, hf, **kw), repeats)
    return inputs["input_ids"].shape[0] * new_tokens / max(tn - t1, 1e-9)


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("CUDA not available: benchmarks/bench_gpu.py needs a CUDA GPU; nothing measured.")
        return 0
    import bench_all
    import transformers

    from qwen2vl.configuration import Qwen2VLConfig
    from qwen2vl.model import Qwen2VLForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(bench_all.CONFIG_2B), help="config.json path, or 'small'")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image", default="1024x768", help="WxH of the TTFT image")
    ap.add_argument("--attn", default="flash_attention_2", help="our attention backend (transformers: sdpa)")
    ap.add_argument("--skip", default="", help="comma list to skip: ttft,decode,compiled,batch8,int8,hf_static")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    config = bench_all.small_config() if args.config == "small" else Qwen2VLConfig.from_pretrained(args.config)
    config.dtype = "bfloat16"
    table = bench_all.Table(digits=4)
    row = table.row

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, cuda {torch.version.cuda}", flush=True)
    bw = hbm_bandwidth_gbs()
    print(f"  device memory copy bandwidth {bw:.0f} GB/s", flush=True)
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        print("building random-weight model ...", flush=True)
        Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval().save_pretrained(tmp)
        ours = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype="bfloat16", device_map="cuda",
                                                               attn_implementation=args.attn, progress=False)
        theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.bfloat16,
                                                                              device_map="cuda")
        theirs.config._attn_implementation = "sdpa"
        roof = bw * 1e9 / bench_all.decode_bytes_per_token(ours)

        hf_b1 = c = None
        inp = to_cuda(bench_all.text_inputs(1))
        hf_inp = to_cuda(bench_all.hf_kwargs(inp, config))
        note = f"[roofline {roof:.0f} tok/s]"

        def ttft():
            w, h = map(int, args.image.split("x"))
            img = to_cuda(bench_all.image_inputs(config, h, w))
            t_ours = cuda_time(lambda: gen(ours, img, 1, False), args.repeats)
            t_hf = cuda_time(lambda: gen(theirs, to_cuda(bench_all.hf_kwargs(img, config)), 1, True), args.repeats)
            row(f"TTFT {args.image} image", t_ours, t_hf, "s", t_hf / t_ours, ">= 2.0x")
            pv, grid = img["pixel_values"].to(torch.bfloat16), img["image_grid_thw"]
            with torch.inference_mode():
                tv = cuda_time(lambda: ours.model.visual(pv, grid), args.repeats)
                tvh = cuda_time(lambda: theirs.model.visual(pv, grid_thw=grid), args.repeats)
            row("vision tower", tv, tvh, "s", tvh / tv, "info")
            if args.attn != "sdpa":
                ours.set_attn_implementation("sdpa")
                with torch.inference_mode():
                    ts = cuda_time(lambda: ours.model.visual(pv, grid), args.repeats)
                ours.set_attn_implementation(args.attn)
                row("vision tower, ours with sdpa", ts, tvh, "s", tvh / ts, "info")

        def hf_decode():
            nonlocal hf_b1
            hf_b1 = decode_tps(theirs, hf_inp, new, args.repeats, True)

        def eager():
            e = decode_tps(ours, inp, new, args.repeats, False)
            row("decode b1 bf16 eager", e, hf_b1, "tok/s", e / hf_b1, ">= 1.1x", f"{note} {100 * e / roof:.0f}%")

        def compiled():
            nonlocal c
            c = decode_tps(ours, inp, new, args.repeats, False, compile=True)
            row("decode b1 bf16 compiled", c, hf_b1, "tok/s", c / hf_b1, ">= 1.1x", f"{note} {100 * c / roof:.0f}%")

        def hf_static():  # transformers' own compiled path (static cache + torch.compile), for reference
            hs = decode_tps(theirs, hf_inp, new, args.repeats, True, cache_implementation="static")
            if c is not None:
                row("decode b1 compiled vs transformers static", c, hs, "tok/s", c / hs, "info")

        def batch8():
            inp8 = to_cuda(bench_all.text_inputs(8))
            h8 = decode_tps(theirs, to_cuda(bench_all.hf_kwargs(inp8, config)), new, args.repeats, True)
            e8 = decode_tps(ours, inp8, new, args.repeats, False)
            row("decode batch 8 eager", e8, h8, "tok/s", e8 / h8, ">= 1.5x")
            if "compiled" not in skip:
                c8 = decode_tps(ours, inp8, new, args.repeats, False, compile=True)
                row("decode batch 8 compiled", c8, h8, "tok/s", c8 / h8, ">= 1.5x")

        for name, fn in (("ttft", ttft), ("hf_decode", hf_decode), ("decode", eager), ("compiled", compiled),
                         ("hf_static", hf_static), ("batch8", batch8)):
            if name not in skip:
                section(name, fn)
        del theirs
        if "int8" not in skip:
            del ours
            torch.cuda.empty_cache()

            def int8():
                q = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype="bfloat16", device_map="cuda",
                                                                    quantization="int8", progress=False)
                qe = decode_tps(q, inp, new, args.repeats, False)
                row("decode b1 int8 eager vs hf bf16", qe, hf_b1, "tok/s", qe / hf_b1, ">= 1.7x")
                if "compiled" not in skip:
                    qc = decode_tps(q, inp, new, args.repeats, False, compile=True)
                    row("decode b1 int8 compiled vs hf bf16", qc, hf_b1, "tok/s", qc / hf_b1, ">= 1.7x")

            section("int8", int8)

    table.print(f"target ({torch.cuda.get_device_name()})")
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
          f"QWEN2VL_DISABLE_KERNELS={os.environ.get('QWEN2VL_DISABLE_KERNELS', '0')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
