"""int4 weight-only decoding on the CPU: checkpoint size, load memory, batch-1 decode against the memory-read
roofline of its bytes, and the 4-bit GEMV kernel's read speed per shape. Also the functions another benchmark
(llama.cpp side by side) uses to put qwen2vl int4 on the same random-weight checkpoint:

    from bench_int4 import int4_checkpoint, load_int4, decode_tps_b1
    q_dir = int4_checkpoint(bf16_dir, out_dir)          # quantize a saved bf16 checkpoint, save it as int4
    model = load_int4(q_dir)                            # an int4 folder (or a bf16 one, quantized at load)
    tok_s = decode_tps_b1(model, new_tokens=32)         # median batch-1 decode tok/s (prefill excluded)

    python benchmarks/bench_int4.py                     # real Qwen2-VL-2B shape, random weights, 2 threads
    python benchmarks/bench_int4.py --config small      # a quick smoke run
    python benchmarks/bench_int4.py --checkpoint DIR    # an existing bf16 or int4 checkpoint folder
    python benchmarks/bench_int4.py --sizes-only        # the 2B's int4 / bf16 file sizes from shapes alone
    python benchmarks/bench_int4.py --gemv 1,4          # exact vs integer-dot-product GEMV, 2B shapes, 1 thread

Timings depend on the machine and its load; the lead's quiet-machine reruns are the figures to quote.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_all import (CONFIG_2B, decode_bytes_per_token, decode_vs_roofline, peak_rss_load,  # noqa: E402
                       small_config, text_inputs, clocked_tps, gen)

from qwen2vl.configuration import Qwen2VLConfig  # noqa: E402
from qwen2vl.model import Qwen2VLForConditionalGeneration  # noqa: E402
from qwen2vl.quantization import Int4WeightOnlyLinear, quantize_model  # noqa: E402


def int4_checkpoint(src: str | Path, dst: str | Path, method: str = "rtn", group_size: int = 128) -> Path:
    """Load the bf16 checkpoint `src`, quantize its decoder to int4 (`method` "rtn": speed is the same as "awq",
    whose search only pays on trained weights) and save it to `dst`."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype="bfloat16", progress=False)
    quantize_model(model, "int4", group_size=group_size, int4_method=method)
    model.save_pretrained(dst)
    return Path(dst)


def load_int4(path: str | Path) -> Qwen2VLForConditionalGeneration:
    """An int4 checkpoint folder as saved, or a bf16 one quantized at load (round to nearest)."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16", progress=False)
    if getattr(model, "quantization", None) != "int4":
        quantize_model(model, "int4", int4_method="rtn")
    return model


def decode_tps_b1(model, new_tokens: int = 32, repeats: int = 5, prompt_len: int = 32) -> float:
    """Median batch-1 decoding rate (tok/s) of `repeats` runs, from the first to the last new token."""
    inp = text_inputs(1, prompt_len)
    gen(model, inp, new_tokens + 1, False)  # warm-up: the kernel choices for these shapes
    return statistics.median(clocked_tps(model, inp, new_tokens, False) for _ in range(repeats))


def file_sizes_from_shapes(config: Qwen2VLConfig, group_size: int = 128) -> tuple[int, int]:
    """(bf16 bytes, int4 bytes) of the checkpoint tensors, computed on the meta device (no memory needed)."""
    from qwen2vl.checkpoint import _named_tensors
    from qwen2vl.quantization.model import decoder_linears

    def nbytes(model) -> int:
        seen, total = set(), 0
        for _, _, t, _ in _named_tensors(model).values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
        bf16 = nbytes(model)
        for parent, name, lin in list(decoder_linears(model)):
            setattr(parent, name, Int4WeightOnlyLinear(lin.in_features, lin.out_features, group_size,
                                                       lin.bias is not None, torch.bfloat16, "meta"))
    return bf16, nbytes(model)


def gemv_read_speed(shapes=((1536, 1536), (8960, 1536), (1536, 8960)), rows=(1, 2, 4, 8), layers: int = 8):
    """GB/s of int4 weight bytes read by `Int4WeightOnlyLinear` (as chosen) per (N, K) and row count, over
    `layers` distinct weights so they do not sit in the cache."""
    out = {}
    for n, k in shapes:
        qs = [Int4WeightOnlyLinear.from_linear(torch.nn.Linear(k, n, bias=False).bfloat16()) for _ in range(layers)]
        nb = sum(q.qweight.numel() + q.scales.numel() * 5 for q in qs)
        for r in rows:
            x = torch.randn(r, k, dtype=torch.bfloat16)
            with torch.inference_mode():
                [q(x) for q in qs]
                ts = []
                for _ in range(10):
                    t = time.perf_counter()
                    [q(x) for q in qs]
                    ts.append(time.perf_counter() - t)
            out[(n, k, r)] = nb / statistics.median(ts) / 1e9
    return out


GEMV_SHAPES = ((1536, 1536), (8960, 1536), (1536, 8960), (151936, 1536))  # 2B: q/o, gate/up, down, LM head


def _huge(t: torch.Tensor) -> torch.Tensor:
    """t copied onto transparent huge pages where offered (how the model's weights are held)."""
    from qwen2vl.own_memory import advise_huge_pages

    out = torch.empty_like(t)
    advise_huge_pages(out)
    return out.copy_(t)


def gemv_old_vs_new(rows=(1,), shapes=GEMV_SHAPES, rounds: int = 7, target_bytes: float = 3e8) -> list[str]:
    """The exact GEMV kernels (int8: bf16-widening, int4: cpu_int4.c) against the integer-dot-product ones
    (cpu_intdot.c) on the 2B's shapes, 1 thread, interleaved with a memory-read probe (torch's sum over 1 GiB of
    fp32 on huge pages) round by round; each side over enough distinct weights to miss the caches. Lines of best
    GB/s of weight bytes (codes + scales / zeros) and that over the best probe."""
    from qwen2vl.kernels import cpu, cpu_int4

    torch.set_num_threads(1)
    if cpu_int4.intdot_isa() is None:
        return ["integer-dot-product kernels unavailable here"]
    probe_buf = _huge(torch.ones(256 * 1024 * 1024))
    isa = "AVX512-VNNI" if cpu_int4.intdot_isa() else "AVX2"
    lines = [f"1 thread, {cpu.flavour()} build, intdot variant {isa}; best of {rounds} interleaved rounds"]
    for n, k in shapes:
        count = max(1, int(target_bytes // (n * k)))
        g = torch.Generator().manual_seed(0)
        w8 = [_huge(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)) for _ in range(count)]
        s8 = torch.rand(n, generator=g).bfloat16()
        b8 = count * (n * k + 2 * n)
        q4 = Int4WeightOnlyLinear.from_linear(torch.nn.Linear(k, n, bias=False).bfloat16())
        w4 = [(_huge(q4.qweight), q4.scales.clone(), q4.zeros.clone()) for _ in range(2 * count)]
        b4 = 2 * count * (n * k // 2 + 5 * n * k // 128)
        for r in rows:
            x = torch.randn(r, k).bfloat16()
            sides = {
                "int8 exact": (b8, lambda: [cpu.linear_int8(x, w, s8) for w in w8]),
                "int8 intdot": (b8, lambda: [cpu_int4.linear_int8_intdot(x, w, s8) for w in w8]),
                "int4 exact": (b4, lambda: [cpu_int4.linear_int4(x, q, s, z, 128) for q, s, z in w4]),
                "int4 intdot": (b4, lambda: [cpu_int4.linear_int4_intdot(x, q, s, z, 128) for q, s, z in w4]),
            }
            best = dict.fromkeys(sides, 0.0)
            probe = 0.0
            for _ in range(rounds):
                t = time.perf_counter()
                probe_buf.sum()
                probe = max(probe, probe_buf.numel() * 4 / (time.perf_counter() - t) / 1e9)
                for name, (nbytes, fn) in sides.items():
                    t = time.perf_counter()
                    fn()
                    best[name] = max(best[name], nbytes / (time.perf_counter() - t) / 1e9)
            cells = ", ".join(f"{name} {gbs:5.1f} GB/s ({gbs / probe:.2f})" for name, gbs in best.items())
            lines.append(f"{n:6d}x{k:<5d} rows {r}: probe {probe:5.1f} GB/s | {cells}")
        del w8, w4
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG_2B), help="config.json path, or 'small'")
    ap.add_argument("--checkpoint", default=None, help="an existing bf16 or int4 checkpoint folder instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes-only", action="store_true")
    ap.add_argument("--gemv", default=None, metavar="ROWS",
                    help="only the exact vs integer-dot-product GEMV comparison for these row counts (e.g. 1,4)")
    args = ap.parse_args(argv)
    if args.gemv:
        print("\n".join(gemv_old_vs_new(tuple(int(r) for r in args.gemv.split(",")))))
        return
    torch.set_num_threads(args.threads)
    config = small_config() if args.config == "small" else Qwen2VLConfig.from_pretrained(args.config)
    config.dtype = "bfloat16"
    bf16, int4 = file_sizes_from_shapes(config)
    text = sum(lin.weight.numel() * 2 for *_, lin in _decoder_shapes(config))
    print(f"checkpoint from shapes: bf16 {bf16 / 2**30:.3f} GiB, int4 {int4 / 2**30:.3f} GiB = {int4 / bf16:.3f}x "
          f"(goal <= 0.35x; the vision tower and the embedding stay bf16: the decoder projections are "
          f"{text / bf16:.0%} of the bf16 file)")
    if args.sizes_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "bf16"
        if not args.checkpoint:
            torch.manual_seed(0)
            Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval().save_pretrained(src)
        model = load_int4(src)
        q_dir = src
        if "qwen2vl_int4" not in (src / "config.json").read_text():  # a bf16 folder: save the int4 one to load
            q_dir = Path(tmp) / "int4"
            model.save_pretrained(q_dir)
        nbytes = decode_bytes_per_token(model)
        tps, roof, ratio, runs = decode_vs_roofline(model, text_inputs(1), args.new_tokens, args.repeats, nbytes)
        print(f"decode b1 int4: {tps:.2f} tok/s, roofline {roof:.2f} tok/s ({nbytes / 1e9:.3f} GB/token) -> "
              f"{ratio:.2f}x  [per run @ GB/s before/after: {runs}]")
        del model
        peak, size = peak_rss_load(q_dir)
        print(f"peak RSS loading the int4 checkpoint: {peak / 2**30:.2f} GiB for {size / 2**30:.2f} GiB of files "
              f"= {peak / size:.2f}x (goal <= 1.2x)")
    for (n, k, r), gbs in gemv_read_speed().items():
        print(f"int4 GEMV {n}x{k} rows {r}: {gbs:.1f} GB/s of int4 weights")


def _decoder_shapes(config):
    from qwen2vl.quantization.model import decoder_linears

    with torch.device("meta"):
        return list(decoder_linears(Qwen2VLForConditionalGeneration(config)))


if __name__ == "__main__":
    main()
