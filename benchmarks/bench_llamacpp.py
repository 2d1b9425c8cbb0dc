"""qwen2vl vs llama.cpp on this machine, in one run, on the same random weights (issue #22's goals; #17's roofline).

    python benchmarks/bench_llamacpp.py                      # setup once (see llamacpp_setup.py), then the table
    python benchmarks/bench_llamacpp.py --setup-only         # build / convert only (first time: ~15 min on 2 cores)
    python benchmarks/bench_llamacpp.py --skip ttft,pp --repeats 3

Real Qwen2-VL-2B shape, random weights (seed 0), 2 threads on both sides. Rows:
* decode batch 1 (tok/s): llama.cpp BF16 / Q8_0 / Q4_0 (`llama-bench -p 0 -n 64`) against our bf16 / int8 / int4
  (int4 where `from_pretrained(quantization="int4")` exists), run interleaved (llama.cpp, ours, llama.cpp, ...)
  with the bench's memory-read probe before, between and after, so each side's tok/s is also given as a fraction of
  the read roofline of its own bytes per token (probes around that very run: a shared VM's bandwidth flips);
* prompt processing of 512 text tokens: `llama-bench -p 512 -n 0` (BF16) against our `generate(max_new_tokens=1)`;
* time to first token for a 1024x768 image + "Describe this image.": llama-mtmd-cli's prompt eval time from its
  --perf log (from the first prompt token to the first token's logits: vision encode and the image and text tokens'
  prefill; model loading excluded) against our processor + `generate(max_new_tokens=1)` from the PIL image.
Every figure is a median; ratios > 1 mean qwen2vl is faster. A full run on 2 quiet cores once set up: ~15 min
(--repeats 5 --image-repeats 3; the image rows are about half of it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import llamacpp_setup  # noqa: E402
from bench_all import (Table, clocked_tps, decode_bytes_per_token, gen, median_time, read_bandwidth_gbs,  # noqa: E402
                       text_inputs)

from qwen2vl.kernels import choose  # noqa: E402

PROMPT = "Describe this image."
OURS_FOR = {"BF16": None, "Q8_0": "int8", "Q4_0": "int4"}  # llama.cpp format -> our quantization
NAMES = {None: "bf16", "int8": "int8", "int4": "int4"}
GOALS = {"BF16": ">= 1.1x", "Q8_0": ">= 1.1x", "Q4_0": ">= 1.1x"}


# ------------------------------------------------------------------------------------------ llama.cpp side
def llama_bench(bin_dir: Path, gguf: Path, threads: int, args: list[str]) -> dict:
    """One llama-bench call (JSON output); its single result row."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-o", "json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)[0]


def gguf_bytes_per_token(tree: Path, gguf: Path) -> int:
    """Bytes one decoded token reads: every tensor of the GGUF but the embedding table, which is read whole only as
    the (tied) output head when the file has no output.weight; with one, the table is read one row a token."""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def mtmd_ttft(bin_dir: Path, files: dict, image: Path, threads: int) -> dict:
    """llama-mtmd-cli on one image: its log's figures (parse_mtmd_log) and `wall`, the whole process in seconds."""
    cmd = [str(bin_dir / "llama-mtmd-cli"), "-m", str(files["BF16"]), "--mmproj", str(files["mmproj"]),
           "--image", str(image), "-p", PROMPT, "-n", "1", "-t", str(threads), "-c", "4096", "--temp", "0",
           "--seed", "0", "--perf", "-lv", "4"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli failed ({out.returncode}):\n{log[-3000:]}")
    return {**parse_mtmd_log(log), "wall": wall}


def parse_mtmd_log(log: str) -> dict:
    """Seconds from llama-mtmd-cli's --perf -lv 4 log: `ttft`, llama_perf's prompt eval time (its clock runs from
    the first prompt token's decode to the first token's logits, so the vision encode between the text chunks is
    inside it), `encode` (the "mtmd batch encoding done" lines), `image_prefill` (the "image decoded" lines), and
    `tokens`, the prompt tokens it counts."""
    enc = re.findall(r"mtmd batch encoding done in (\d+) ms", log)
    dec = re.findall(r"image decoded \(batch \d+/\d+\) in (\d+) ms", log)
    pe = re.search(r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens", log)
    if not enc or not pe:
        raise ValueError(f"llama-mtmd-cli's log has no vision-encode or prompt-eval time (format changed?):\n"
                         f"{log[-3000:]}")
    return {"ttft": float(pe.group(1)) / 1e3, "encode": sum(map(int, enc)) / 1e3,
            "image_prefill": sum(map(int, dec)) / 1e3, "tokens": int(pe.group(2))}


# ------------------------------------------------------------------------------------------ our side
def load_ours(ckpt: Path, quantization):
    """Our model from the shared checkpoint, or None with a line saying why (int4 before it exists)."""
    from qwen2vl import Qwen2VLForConditionalGeneration

    try:
        return Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype="bfloat16", quantization=quantization,
                                                               progress=False)
    except (ValueError, NotImplementedError) as e:
        if quantization is None:
            raise
        print(f"  {quantization}: not available ({e})", flush=True)
        return None


# ------------------------------------------------------------------------------------------ measurements
def decode_interleaved(setup: dict, fmt: str, model, threads: int, new_tokens: int, repeats: int):
    """llama.cpp `fmt` and our model, one run each in turn, probes between: medians of (tok/s, roofline fraction)
    per side, and each run's fractions with the probes' GB/s as text."""
    inp = text_inputs(1, 8)
    gen(model, inp, new_tokens + 1, False)  # warm-up (backend choices, first-call costs)
    ours_bytes = decode_bytes_per_token(model)
    llama_bytes = gguf_bytes_per_token(setup["tree"], setup["gguf"][fmt])
    lt, lr, ot, orr, runs = [], [], [], [], []
    probe = read_bandwidth_gbs()
    for _ in range(repeats):
        row = llama_bench(setup["bin"], setup["gguf"][fmt], threads, ["-p", "0", "-n", str(new_tokens), "-r", "1"])
        mid = read_bandwidth_gbs()
        lt.append(row["samples_ts"][0])
        lr.append(lt[-1] * llama_bytes / ((probe + mid) / 2 * 1e9))
        ot.append(clocked_tps(model, inp, new_tokens, False))
        after = read_bandwidth_gbs()
        orr.append(ot[-1] * ours_bytes / ((mid + after) / 2 * 1e9))
        runs.append(f"{lr[-1]:.2f}/{orr[-1]:.2f}@{probe:.0f},{mid:.0f},{after:.0f}")
        probe = after
    med = statistics.median
    return (med(ot), med(orr), ours_bytes), (med(lt), med(lr), llama_bytes), " ".join(runs)


def ours_ttft(model, processor, image, repeats: int) -> tuple[float, int]:
    """Median seconds from the PIL image and the question to the first token (processor + generate), and the
    prompt's length in tokens."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def once():
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        gen(model, dict(inputs), 1, False)

    n_prompt = processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]
    return median_time(once, repeats), n_prompt


def decode_row(table, setup, fmt, quant, model, args) -> None:
    (o_tps, o_roof, o_bytes), (l_tps, l_roof, l_bytes), runs = decode_interleaved(
        setup, fmt, model, args.threads, args.new_tokens, args.repeats)
    table.row(f"decode b1 ours {NAMES[quant]} vs llama.cpp {fmt}", o_tps, l_tps, "tok/s", o_tps / l_tps, GOALS[fmt],
              f"[of the read roofline: ours {o_roof:.2f} ({o_bytes / 1e9:.2f} GB/token), llama.cpp {l_roof:.2f} "
              f"({l_bytes / 1e9:.2f} GB/token); per run llama.cpp/ours@GB/s before,between,after: {runs}]")


def prompt_row(table, setup, model, args) -> None:
    inp = text_inputs(1, 512)
    t = median_time(lambda: gen(model, inp, 1, False), args.repeats)
    row = llama_bench(setup["bin"], setup["gguf"]["BF16"], args.threads,
                      ["-p", "512", "-n", "0", "-r", str(args.repeats)])
    pp = statistics.median(row["samples_ts"])
    table.row("prompt 512 text tokens (ours bf16 generate(max_new_tokens=1), llama.cpp BF16 pp512)", 512 / t, pp,
              "tok/s", 512 / t / pp, ">= 3.0x")


def ttft_row(table, setup, model, args) -> None:
    from PIL import Image

    from qwen2vl import AutoProcessor

    width, height = map(int, args.image.lower().split("x"))
    path = llamacpp_setup.noise_image(width, height)
    image = Image.open(path).convert("RGB")
    t_ours, n_prompt = ours_ttft(model, AutoProcessor.from_pretrained(setup["ckpt"]), image, args.image_repeats)
    runs = [mtmd_ttft(setup["bin"], setup["gguf"], path, args.threads) for _ in range(args.image_repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    table.row(f"TTFT {width}x{height} image + short prompt (ours bf16; llama.cpp BF16 + f16 mmproj)", t_ours,
              med["ttft"], "s", med["ttft"] / t_ours, ">= 2.0x",
              f"[goal: ours <= 0.5x llama.cpp's; ours from the PIL image, {n_prompt} prompt tokens; llama.cpp prompt "
              f"eval of {med['tokens']} tokens: vision encode {med['encode']:.1f} s, image tokens "
              f"{med['image_prefill']:.1f} s, the rest text; its whole process incl. loading {med['wall']:.1f} s]")


def print_machine(setup, threads: int) -> None:
    c, ids = choose.cpu_description(), llamacpp_setup.cpuinfo()
    info = llama_bench(setup["bin"], setup["gguf"]["Q4_0"], threads, ["-p", "0", "-n", "1", "-r", "1"])
    print(f"machine: {c['vendor']} {c['model']} (family {ids.get('cpu family', '?')} model {ids.get('model', '?')}) "
          f"[{c['flags']}], {os.cpu_count()} cpus, threads {threads}; torch {torch.__version__}; llama.cpp "
          f"{info['build_commit']} (llama-cpp-python {llamacpp_setup.SDIST_VERSION} vendored, -march=native"
          f"{', AMX fix' if setup['amx_fix'] else ''}), its cpu_info {info['cpu_info']!r}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="runs per decode / pp512 figure (median)")
    ap.add_argument("--image-repeats", type=int, default=3, help="runs per TTFT figure (median)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per decode run (llama-bench -n)")
    ap.add_argument("--image", default="1024x768", help="WxH of the TTFT image (random noise)")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: bf16,int8,int4,pp,ttft")
    ap.add_argument("--setup-only", action="store_true", help="build, convert and cache; measure nothing")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"bf16", "int8", "int4", "pp", "ttft"}:
        ap.error(f"unknown --skip entries {sorted(skip - {'bf16', 'int8', 'int4', 'pp', 'ttft'})}")
    if not re.fullmatch(r"\d+x\d+", args.image.lower()):
        ap.error(f"--image must be WxH, e.g. 1024x768 (got {args.image!r})")
    t_start = time.time()
    setup = llamacpp_setup.setup()
    print(f"setup ready in {time.time() - t_start:.0f} s (cache {llamacpp_setup.CACHE})", flush=True)
    if args.setup_only:
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault(choose.BUDGET_ENV, "120")  # every backend decision made in the warm-ups
    print_machine(setup, args.threads)
    table = Table(digits=2, theirs="llama.cpp")
    for fmt, quant in OURS_FOR.items():
        extra = [] if quant is not None else [r for r in ("pp", "ttft") if r not in skip]
        decode = NAMES[quant] not in skip
        if not (decode or extra):
            continue
        model = load_ours(setup["ckpt"], quant)
        if model is None:
            continue
        if decode:
            decode_row(table, setup, fmt, quant, model, args)
        if "pp" in extra:
            prompt_row(table, setup, model, args)
        if "ttft" in extra:
            ttft_row(table, setup, model, args)
        del model
    table.print(f"target ({args.threads} thread{'s' if args.threads > 1 else ''}, medians)")
    print(f"\nrun took {time.time() - t_start:.0f} s; backends ({choose.machine_key()}):")
    for op, line in choose.summary().items():
        print(f"  {op}: {line}")


if __name__ == "__main__":
    main()
