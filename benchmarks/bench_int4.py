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
    python benchmarks/bench_int4.py --sizes-only        # the 2B's int4 / bf16 file sizes from shapes alone, per
                                                        # embedding / vision option
    python benchmarks/bench_int4.py --rss --checkpoint /tmp/q2b [--embedding int8 --vision int8]
                                                        # peak RSS loading the int4 2B / its file size
    python benchmarks/bench_int4.py --quality           # KL / top-1 vs bf16 per option on the demo model
    python benchmarks/bench_int4.py --gemv 1,4          # exact vs integer-dot-product GEMV, 2B shapes, 1 thread

Timings depend on the machine and its load; the lead's quiet-machine reruns are the figures to quote.
"""
from __future__ import annotations

import argparse
import json
import os
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


def int4_checkpoint(src: str | Path, dst: str | Path, method: str = "rtn", group_size: int = 128,
                    **options) -> Path:
    """Load the bf16 checkpoint `src`, quantize its decoder to int4 (`method` "rtn": speed is the same as "awq",
    whose search only pays on trained weights; `options`: quantize_model's embedding= / vision=) and save it to
    `dst`."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype="bfloat16", progress=False)
    quantize_model(model, "int4", group_size=group_size, int4_method=method, **options)
    model.save_pretrained(dst)
    return Path(dst)


def load_int4(path: str | Path, **options) -> Qwen2VLForConditionalGeneration:
    """An int4 checkpoint folder as saved, or a bf16 one quantized at load (round to nearest, `options`)."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16", progress=False)
    if getattr(model, "quantization", None) != "int4":
        quantize_model(model, "int4", int4_method="rtn", **options)
    return model


def decode_tps_b1(model, new_tokens: int = 32, repeats: int = 5, prompt_len: int = 32) -> float:
    """Median batch-1 decoding rate (tok/s) of `repeats` runs, from the first to the last new token."""
    inp = text_inputs(1, prompt_len)
    gen(model, inp, new_tokens + 1, False)  # warm-up: the kernel choices for these shapes
    return statistics.median(clocked_tps(model, inp, new_tokens, False) for _ in range(repeats))


def file_sizes_from_shapes(config: Qwen2VLConfig, group_size: int = 128, lm_head: str | bool = "int8",
                          embedding: str | bool = False, vision: str | bool = False) -> tuple[int, int]:
    """(bf16 bytes, int4 bytes) of the checkpoint tensors, computed on the meta device (no memory needed): the
    layers the int4 loader builds for these `quantize_model` options (a tied head is the embedding's table)."""
    from qwen2vl.checkpoint import _named_tensors
    from qwen2vl.quantization.serialization import OWN_INT4, prepare_quantized

    def nbytes(model) -> int:
        seen, total = set(), 0
        for _, _, t, _ in _named_tensors(model).values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    tied = bool(config.tie_word_embeddings)
    qcfg = {"quant_method": OWN_INT4, "bits": 4, "group_size": group_size, "embedding": embedding,
            "vision": vision, "lm_head": embedding if tied and embedding else lm_head}
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
        bf16 = nbytes(model)
        prepare_quantized(model, qcfg, None, torch.bfloat16)
    return bf16, nbytes(model)


SIZE_OPTIONS = (  # (embedding, vision) rows of the --sizes-only table
    (False, False), ("int8", False), ("int4", False), (False, "int8"), (False, "int4"), ("int8", "int8"),
    ("int4", "int8"), ("int8", "int4"), ("int4", "int4"))


def size_table(config: Qwen2VLConfig) -> list[str]:
    """One line per (embedding, vision) option: the int4 file against the bf16 one (goal <= 0.35x)."""
    lines = []
    for emb, vis in SIZE_OPTIONS:
        bf16, int4 = file_sizes_from_shapes(config, embedding=emb, vision=vis)
        lines.append(f"  embedding={emb!s:5} vision={vis!s:5}: int4 file {int4 / 2**30:.3f} GiB = {int4 / bf16:.3f}x "
                     f"the bf16 {bf16 / 2**30:.3f} GiB")
    return lines


QUALITY_OPTIONS = ((False, False), ("int8", False), ("int4", False), (False, "int8"), (False, "int4"),
                   ("int8", "int8"), ("int4", "int8"), ("int8", "int4"))


def option_quality(model_name: str = "qwen2vl-demo") -> list[str]:
    """Next-token KL / top-1 agreement with the bf16 model of int4 (the default AWQ-style scaling on the model's
    calibration texts) with each (embedding, vision) option, on a trained model (the bundled demo: realistic weight
    scales): the text prompt set of `quality.EVAL_TEXTS` and the demo's 9 questions about its 3 example pictures."""
    import copy

    from PIL import Image

    from qwen2vl.demo.examples import EXAMPLES
    from qwen2vl.loading import demo_model_path, resolve_name
    from qwen2vl.processing import AutoProcessor
    from qwen2vl.quantization.awq import calibration_ids
    from qwen2vl.quantization.quality import eval_ids, image_prompts, next_token_agreement

    ref = Qwen2VLForConditionalGeneration.from_pretrained(model_name, dtype="bfloat16", progress=False)
    processor = AutoProcessor.from_pretrained(model_name)
    assets = demo_model_path().parent / "assets"
    pictures = [(Image.open(assets / n).convert("RGB"), q, a) for n, ex in EXAMPLES.items() for q, a in ex["qa"]]
    text, images = eval_ids(processor.tokenizer), image_prompts(processor, pictures)
    cal = calibration_ids(resolve_name(model_name), ref.config.get_text_config().vocab_size)
    lines = []
    for emb, vis in QUALITY_OPTIONS:
        q = quantize_model(copy.deepcopy(ref), "int4", calibration=cal, embedding=emb, vision=vis)
        t, i = next_token_agreement(ref, q, text), next_token_agreement(ref, q, images)
        lines.append(f"  embedding={emb!s:5} vision={vis!s:5}: text top-1 {t['top1']:.1%} KL {t['kl']:.4f} "
                     f"({t['positions']} positions) | with pictures top-1 {i['top1']:.1%} KL {i['kl']:.4f} "
                     f"({i['positions']})")
    return lines


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
    ap.add_argument("--embedding", default="auto", choices=("auto", "false", "int8", "int4"),
                    help="quantize_model's embedding= for the checkpoint measured (auto: its default)")
    ap.add_argument("--vision", default="false", choices=("false", "int8", "int4"),
                    help="quantize_model's vision= for the checkpoint measured")
    ap.add_argument("--quality", action="store_true",
                    help="only the KL / top-1 against bf16 of each embedding / vision option on the demo model")
    ap.add_argument("--rss", action="store_true",
                    help="only the peak RSS of loading the int4 checkpoint (made from --checkpoint or random weights)")
    ap.add_argument("--gemv", default=None, metavar="ROWS",
                    help="only the exact vs integer-dot-product GEMV comparison for these row counts (e.g. 1,4)")
    args = ap.parse_args(argv)
    if args.quality:
        print("int4 quality against bf16 per option (demo model):\n" + "\n".join(option_quality()))
        return
    if args.gemv:
        print("\n".join(gemv_old_vs_new(tuple(int(r) for r in args.gemv.split(",")))))
        return
    torch.set_num_threads(args.threads)
    config = small_config() if args.config == "small" else Qwen2VLConfig.from_pretrained(args.config)
    config.dtype = "bfloat16"
    options = {k: {"false": False, "auto": None}.get(v, v) for k, v in (("embedding", args.embedding),
                                                                           ("vision", args.vision))}
    text = sum(lin.weight.numel() * 2 for *_, lin in _decoder_shapes(config))
    print(f"checkpoint from shapes (goal <= 0.35x; the decoder projections are {text / (2 * _numel(config)):.0%} "
          f"of the bf16 file):")
    print("\n".join(size_table(config)))
    if args.sizes_only:
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("QWEN2VL_BENCH_TMP")) as tmp:
        src = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "bf16"
        if not args.checkpoint:
            torch.manual_seed(0)
            Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval().save_pretrained(src)
        q_dir = src
        if "qwen2vl_int4" not in (src / "config.json").read_text():  # a bf16 folder: save the int4 one to load
            q_dir = int4_checkpoint(src, Path(tmp) / "int4", **options)
        if args.rss:
            return print_rss(q_dir)
        model = load_int4(q_dir)
        nbytes = decode_bytes_per_token(model)
        tps, roof, ratio, runs = decode_vs_roofline(model, text_inputs(1), args.new_tokens, args.repeats, nbytes)
        print(f"decode b1 int4: {tps:.2f} tok/s, roofline {roof:.2f} tok/s ({nbytes / 1e9:.3f} GB/token) -> "
              f"{ratio:.2f}x  [per run @ GB/s before/after: {runs}]")
        del model
        print_rss(q_dir)
    for (n, k, r), gbs in gemv_read_speed().items():
        print(f"int4 GEMV {n}x{k} rows {r}: {gbs:.1f} GB/s of int4 weights")


def print_rss(q_dir: Path) -> None:
    peak, size = peak_rss_load(q_dir)
    qc = json.loads((q_dir / "config.json").read_text())["quantization_config"]
    opts = ", ".join(f"{k}={qc.get(k, False)}" for k in ("lm_head", "embedding", "vision"))
    print(f"peak RSS loading the int4 checkpoint ({opts}): {peak / 2**30:.2f} GiB for {size / 2**30:.2f} GiB of "
          f"files = {peak / size:.2f}x (goal <= 1.2x)")


def _numel(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2VLForConditionalGeneration(config).parameters())


def _decoder_shapes(config):
    from qwen2vl.quantization.model import decoder_linears

    with torch.device("meta"):
        return list(decoder_linears(Qwen2VLForConditionalGeneration(config)))


if __name__ == "__main__":
    main()
