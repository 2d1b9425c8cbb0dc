"""One table of the performance targets (issue #7): qwen2vl vs transformers in the same run, same random weights.

    python benchmarks/bench_all.py                      # real Qwen2-VL-2B shape, bf16, 2 threads
    python benchmarks/bench_all.py --config small       # a quick smoke run on a small shape

Each figure is the median of --repeats runs. Ratios > 1 mean qwen2vl is faster (or, for memory, smaller).
Not a test: timings depend on the machine; the printed table states the machine (CPU vendor, model, flags) and,
after it, which backend each op ran (qwen2vl/kernels/choose.py: measured on this machine in the warm-up runs, or
read from its record; QWEN2VL_BACKEND=torch / kernels / op=choice forces them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG_2B = Path(os.environ.get("QWEN2VL_SHARED", ROOT.parent / "shared")) / "qwen2-vl/Qwen2-VL-2B-Instruct/config.json"

from qwen2vl.configuration import Qwen2VLConfig  # noqa: E402
from qwen2vl.kernels import choose  # noqa: E402
from qwen2vl.model import Qwen2VLForConditionalGeneration  # noqa: E402
from qwen2vl.quantization import quantize_model  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Table:
    """Benchmark rows (target, ours, transformers, unit, ratio, goal, notes): each printed as it is measured, then
    all of them as one markdown table with pass/fail. Shared with bench_gpu.py and bench_llamacpp.py (`theirs`: the
    name of the other column)."""

    def __init__(self, digits: int = 3, theirs: str = "transformers"):
        self.rows, self.digits, self.theirs = [], digits, theirs

    def row(self, name, ours, theirs, unit, ratio, goal, extra=""):
        self.rows.append((name, ours, theirs, unit, ratio, goal, extra))
        d = self.digits
        print(f"  {name}: ours {ours:.{d}f} {unit}, {self.theirs} {theirs:.{d}f} {unit}, ratio {ratio:.2f}x "
              f"(goal {goal}) {extra}", flush=True)

    def print(self, title: str = "target") -> None:
        print(f"\n| {title} | qwen2vl | {self.theirs} | unit | ratio | goal | pass | notes |")
        print("|---|---|---|---|---|---|---|---|")
        d = self.digits
        for name, a, b, unit, ratio, goal, extra in self.rows:
            ok = ""
            if goal.startswith(">="):
                ok = "PASS" if ratio >= float(goal.split()[1].rstrip("x")) else "FAIL"
            elif goal.startswith("ratio <="):
                ok = "PASS" if a <= float(goal.split()[2]) else "FAIL"
            print(f"| {name} | {a:.{d}f} | {b:.{d}f} | {unit} | {ratio:.2f}x | {goal} | {ok} | {extra} |")


def small_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=6, embed_dim=384, hidden_size=512, num_heads=6, mlp_ratio=4,
                           spatial_merge_size=2, temporal_patch_size=2, patch_size=14),
        tie_word_embeddings=True, dtype="bfloat16", vision_start_token_id=30001, vision_end_token_id=30002,
        image_token_id=30003, video_token_id=30004)


# ------------------------------------------------------------------------------------------ machine figures
def matmul_tflops(dtype) -> float:
    """torch's (4096 x 1280) x (1280 x 5120) product (F.linear: torch's `@` on bf16 without native bf16 support
    takes a far slower path, ~0.001 TFLOP/s on AVX2)."""
    a = torch.randn(4096, 1280, dtype=dtype)
    w = torch.randn(5120, 1280, dtype=dtype)
    t = median_time(lambda: torch.nn.functional.linear(a, w), 5)
    return 2 * 4096 * 1280 * 5120 / t / 1e12


def read_bandwidth_gbs() -> float:
    """torch's sum over 1 GiB of fp32, the better of a plain buffer and one on transparent huge pages (qwen2vl puts
    its CPU weights on huge pages where the kernel offers them, and they read faster there, so the roofline must
    use the same kind of memory)."""
    from qwen2vl.own_memory import advise_huge_pages

    best = 0.0
    for huge in (False, True):
        x = torch.empty(256 * 1024 * 1024, dtype=torch.float32)
        if huge:
            advise_huge_pages(x)
        x.fill_(1.0)  # touched so pages are real
        best = max(best, x.numel() * 4 / median_time(lambda: x.sum(), 5) / 1e9)
        del x
    return best


def vision_flops(vc, n_patches: int) -> float:
    e, m = vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio)
    per_layer = 2 * n_patches * (4 * e * e + 2 * e * m) + 4 * n_patches * n_patches * e
    merged = n_patches // vc.spatial_merge_size ** 2
    h = e * vc.spatial_merge_size ** 2
    return vc.depth * per_layer + 2 * merged * (h * h + h * vc.hidden_size) + 2 * n_patches * 1176 * e


def decode_bytes_per_token(model) -> int:
    text = model.model.language_model
    total = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if "embed_tokens" not in n)
    total += sum(b.numel() * b.element_size() for b in text.buffers())
    head = model.lm_head
    total += sum(t.numel() * t.element_size() for t in list(head.parameters()) + list(head.buffers()))
    return total


# ------------------------------------------------------------------------------------------ inputs
def image_inputs(config, height: int, width: int, text_len: int = 16, seed: int = 0):
    from qwen2vl.processing.image_processing import smart_resize

    h, w = smart_resize(height, width, min_pixels=3136, max_pixels=12845056)
    grid = torch.tensor([[1, h // 14, w // 14]])
    n_tok = int(grid.prod()) // config.vision_config.spatial_merge_size ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 1000, (text_len,), generator=g).tolist()
    ids = [config.vision_start_token_id] + [config.image_token_id] * n_tok + [config.vision_end_token_id] + text
    input_ids = torch.tensor([ids])
    pv = torch.randn(int(grid.prod()), 1176, generator=g)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pv,
                image_grid_thw=grid)


def text_inputs(batch: int, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (batch, length), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def hf_kwargs(inputs, config):
    out = dict(inputs)
    ids = inputs["input_ids"]
    out["mm_token_type_ids"] = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
    return out


def gen(model, inputs, new_tokens: int, hf: bool, **kw):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              **({"pad_token_id": 0} if hf else {}), **kw)


class StepClock:
    """A generate() streamer that only notes when each put arrives: the prompt, then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def clocked_tps(model, inputs, new_tokens: int, hf: bool) -> float:
    """One generate() call's decoding rate for one sequence, clocked inside it by a streamer from the first to the
    last new token (no prefill time in it)."""
    clock = StepClock()
    gen(model, inputs, new_tokens + 1, hf, streamer=clock)
    t = clock.times  # [prompt, token 1 (after the prefill), ..., token new_tokens + 1]
    return (len(t) - 2) / (t[-1] - t[1])


def decode_tps(model, inputs, new_tokens, repeats, hf):
    """Decoded tokens per second. One sequence: the median of `clocked_tps` runs. Batches (streamers take one
    sequence): the difference of the median times for new_tokens + 1 and for 1 new token."""
    if inputs["input_ids"].shape[0] == 1:
        gen(model, inputs, new_tokens + 1, hf)  # warm-up
        return statistics.median(clocked_tps(model, inputs, new_tokens, hf) for _ in range(repeats))
    t1 = median_time(lambda: gen(model, inputs, 1, hf), repeats)
    tn = median_time(lambda: gen(model, inputs, new_tokens + 1, hf), repeats)
    return inputs["input_ids"].shape[0] * new_tokens / max(tn - t1, 1e-9)


def decode_vs_roofline(model, inputs, new_tokens: int, repeats: int, nbytes: int):
    """Our batch-1 decode speed against the memory-read roofline, run by run: each run (`clocked_tps`) sits between
    two read-bandwidth probes; its roofline is bytes per token / the probes' mean and the ratio is taken per run (a
    shared VM's bandwidth flips between levels within seconds, so one probe for all runs can belong to another
    level). Returns medians of tok/s, roofline tok/s and ratio, and each run's ratio with its probes as text."""
    gen(model, inputs, new_tokens + 1, False)  # warm-up
    tps, roofs, ratios, probes = [], [], [], []
    for _ in range(repeats):
        before = read_bandwidth_gbs()
        tps.append(clocked_tps(model, inputs, new_tokens, False))
        after = read_bandwidth_gbs()
        roofs.append((before + after) / 2 * 1e9 / nbytes)
        ratios.append(tps[-1] / roofs[-1])
        probes += [before, after]
    runs = " ".join(f"{r:.2f}@{a:.0f}/{b:.0f}" for r, a, b in zip(ratios, probes[::2], probes[1::2]))
    return statistics.median(tps), statistics.median(roofs), statistics.median(ratios), runs


def peak_rss_load(model_dir: Path) -> tuple[float, float]:
    """Peak resident memory added by loading (and touching) the checkpoint in a fresh process: the kernel's
    high-water mark is reset just before loading (/proc/self/clear_refs), so transient peaks of `import torch`
    do not hide it; the figure is that peak minus the resident size before loading."""
    code = ("import sys,torch; sys.path.insert(0, %r); torch.set_num_threads(2);"
            "from qwen2vl import Qwen2VLForConditionalGeneration as M;"
            "kb=lambda k: int(open('/proc/self/status').read().split(k + ':')[1].split()[0]);"
            "base=kb('VmRSS'); open('/proc/self/clear_refs', 'w').write('5');"
            "m=M.from_pretrained(%r, dtype='bfloat16', progress=False);"
            # weights may stay file-backed (mmap) until used: read every byte of each one (and of the int4 / int8
            # buffers) so they count; max over the raw bytes allocates nothing (sum() would up-cast an int8 or
            # uint8 tensor to a whole int64 copy first: +1.8 GB on the 2B's int8 LM head)
            "[int(t.detach().reshape(-1).view(torch.uint8).max()) for t in (*m.parameters(), *m.buffers()) "
            "if t.numel()];"
            "print(kb('VmHWM') - base)") % (str(ROOT), str(model_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1]) * 1024
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return peak, size


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG_2B), help="config.json path, or 'small'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--image", default="1024x768", help="WxH of the TTFT image")
    ap.add_argument("--skip", default="", help="comma list of targets to skip: ttft,decode,int8,int4,batch8,rss,preproc")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    config = small_config() if args.config == "small" else Qwen2VLConfig.from_pretrained(args.config)
    config.dtype = "bfloat16"
    table = Table()
    row = table.row

    # every backend decision made in this run's warm-ups (not cut short by the 2 s a model load allows)
    os.environ.setdefault(choose.BUDGET_ENV, "120")
    c = choose.cpu_description()
    print(f"machine: {c['vendor']} {c['model']} [{c['flags']}] ({platform.machine()}), {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"{choose.ENV}={os.environ.get(choose.ENV, '') or 'auto'}", flush=True)
    mm_bf16, mm_fp32 = matmul_tflops(torch.bfloat16), matmul_tflops(torch.float32)
    # The vision tower's reference: the machine's best matmul for bf16 work. Where bf16 is emulated (no
    # AVX512-BF16 / AMX) that is fp32 on widened operands, which is what qwen2vl runs there.
    mm = max(mm_bf16, mm_fp32)
    bw = read_bandwidth_gbs()
    print(f"  matmul bf16 {mm_bf16:.3f} / fp32 {mm_fp32:.3f} TFLOP/s, memory read {bw:.1f} GB/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        print("building random-weight model ...", flush=True)
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
        model.save_pretrained(tmp)
        del model
        ours = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype="bfloat16", progress=False)
        theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.bfloat16)
        theirs.config._attn_implementation = "sdpa"

        if "ttft" not in skip:
            w, h = map(int, args.image.split("x"))
            inp = image_inputs(config, h, w)
            t_ours = median_time(lambda: gen(ours, inp, 1, False), args.repeats)
            t_hf = median_time(lambda: gen(theirs, hf_kwargs(inp, config), 1, True), args.repeats)
            row(f"TTFT {args.image} image", t_ours, t_hf, "s", t_hf / t_ours, ">= 2.0x")
            pv, grid = inp["pixel_values"].to(torch.bfloat16), inp["image_grid_thw"]
            with torch.inference_mode():
                tv = median_time(lambda: ours.model.visual(pv, grid), args.repeats)
                tvh = median_time(lambda: theirs.model.visual(pv, grid_thw=grid), args.repeats)
            tfl = vision_flops(config.vision_config, int(grid.prod())) / tv / 1e12
            row("vision tower", tv, tvh, "s", tvh / tv, "info",
                f"[{tfl:.3f} TFLOP/s = {100 * tfl / mm:.0f}% of matmul, goal >= 50%]")

        if "decode" not in skip or "int8" not in skip or "int4" not in skip:
            inp = text_inputs(1)
            hf_b1 = decode_tps(theirs, hf_kwargs(inp, config), args.new_tokens, args.repeats, True)
        if "decode" not in skip:
            nbytes = decode_bytes_per_token(ours)
            ours_b1 = decode_tps(ours, inp, args.new_tokens, args.repeats, False)
            row("decode b1 bf16", ours_b1, hf_b1, "tok/s", ours_b1 / hf_b1, ">= 1.1x")
            clocked, roof, ratio, runs = decode_vs_roofline(ours, inp, args.new_tokens, max(args.repeats, 5), nbytes)
            row("decode b1 bf16 vs memory roofline (2nd column)", clocked, roof, "tok/s", ratio, ">= 0.9x",
                f"[{nbytes / 1e9:.2f} GB/token; ratio per run @ GB/s read before/after it: {runs}]")
        if "batch8" not in skip:
            inp8 = text_inputs(8)
            gen(ours, inp8, 2, False)  # warm-up: 8-row decoding's backend decisions, out of the timed runs
            o8 = decode_tps(ours, inp8, args.new_tokens, args.repeats, False)
            h8 = decode_tps(theirs, hf_kwargs(inp8, config), args.new_tokens, args.repeats, True)
            row("decode batch 8", o8, h8, "tok/s", o8 / h8, ">= 1.5x")
        del theirs
        if "int8" not in skip:
            q = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype="bfloat16", quantization="int8",
                                                                progress=False)
            q_b1 = decode_tps(q, inp, args.new_tokens, args.repeats, False)
            row("decode b1 int8 vs hf bf16", q_b1, hf_b1, "tok/s", q_b1 / hf_b1, ">= 1.7x")
            del q
        if "int4" not in skip:  # round to nearest: the same speed as the AWQ-scaled default
            q = quantize_model(Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype="bfloat16", progress=False),
                               "int4", int4_method="rtn")
            nbytes = decode_bytes_per_token(q)
            clocked, roof, ratio, runs = decode_vs_roofline(q, inp, args.new_tokens, max(args.repeats, 5), nbytes)
            row("decode b1 int4 vs memory roofline (2nd column)", clocked, roof, "tok/s", ratio, ">= 0.9x",
                f"[{nbytes / 1e9:.2f} GB/token; {clocked / hf_b1:.2f}x hf bf16; per run: {runs}]")
            del q
        if "rss" not in skip:
            peak, size = peak_rss_load(tmp)
            row("peak RSS loading / checkpoint", peak / size, 1.15, "x", 1.15 / (peak / size), "ratio <= 1.15",
                f"[{peak / 2**30:.2f} GiB for {size / 2**30:.2f} GiB]")
    if "preproc" not in skip:
        import numpy as np
        from PIL import Image

        from qwen2vl.processing.image_processing import Qwen2VLImageProcessor

        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8))
        mine = Qwen2VLImageProcessor(max_pixels=12845056)
        t_mine = median_time(lambda: mine(img, return_tensors="pt"), args.repeats)
        import importlib.util

        if importlib.util.find_spec("torchvision") is not None:
            oracle = transformers.Qwen2VLImageProcessor(max_pixels=12845056)
            label = "torch"
        else:  # the oracle's torch processor needs torchvision, which cannot sit beside this torch
            oracle = transformers.Qwen2VLImageProcessorPil(max_pixels=12845056)
            label = "PIL; torchvision unavailable"
        t_or = median_time(lambda: oracle(img, return_tensors="pt"), args.repeats)
        row(f"preprocess 1920x1080 (oracle {label})", t_mine, t_or, "s", t_or / t_mine, ">= 1.0x")

    table.print()
    print(f"\nbackends ({choose.machine_key()}; record: {choose.choices_path()}):")
    for op, line in choose.summary().items():
        print(f"  {op}: {line}")
    print(json.dumps({"rss_maxrss_kb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
    main()
