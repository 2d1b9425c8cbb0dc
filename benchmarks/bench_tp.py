"""Tensor parallelism (issue #8): decode tokens/s at TP=1 vs TP=N on the same random weights.

    python benchmarks/bench_tp.py                        # CPU, gloo, small shape (informational)
    python benchmarks/bench_tp.py --device cuda --tp 1 2 # NCCL, rank r on cuda:r (needs N GPUs for TP=N)
    python benchmarks/bench_tp.py --config 2b --device cuda --dtype bfloat16

TP=1 is the plain single-process model (no process group). TP=N loads the checkpoint with
`from_pretrained(tp_plan="auto")` in N processes spawned by `qwen2vl.parallel.spawn.launch`. On CPU every run gets
the same total number of threads (--threads, split over the ranks), so TP cannot win there: the figure shows
the communication overhead. Not a test: timings depend on the machine; the output states it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG_2B = Path(os.environ.get("QWEN2VL_SHARED", ROOT.parent / "shared")) / "qwen2-vl/Qwen2-VL-2B-Instruct/config.json"

from qwen2vl.configuration import Qwen2VLConfig  # noqa: E402
from qwen2vl.model import Qwen2VLForConditionalGeneration  # noqa: E402


def make_config(name: str) -> Qwen2VLConfig:
    if name == "2b":
        return Qwen2VLConfig.from_json_file(CONFIG_2B)
    return Qwen2VLConfig(
        text_config=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, tie_word_embeddings=True),
        vision_config=dict(depth=2, embed_dim=256, hidden_size=1024, num_heads=4, mlp_ratio=2,
                           spatial_merge_size=2, temporal_patch_size=2, patch_size=14),
        image_token_id=31995, video_token_id=31996, vision_start_token_id=31997, vision_end_token_id=31998)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_rate(model, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """Greedy decode on the KV cache; tokens/s of the decode steps only (prefill excluded), median of repeats."""
    device = model.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (batch, prompt), generator=g).to(device)
    rates, prefill = [], []
    for rep in range(repeats + 1):               # first run is warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        if rep:
            rates.append(batch * new / (t2 - t1))
            prefill.append(t1 - t0)
    return {"decode_tok_s": statistics.median(rates), "prefill_s": statistics.median(prefill),
            "last_tokens": tok.flatten().tolist()}


def _tp_rank(model_dir: str, dtype: str, device: str, args: dict) -> dict:
    from qwen2vl.parallel import init_distributed

    init_distributed(backend="nccl" if device == "cuda" else "gloo")
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto", dtype=dtype,
                                                            progress=False)
    res = decode_rate(model, **args)
    res["param_bytes_rank"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "2b"], default="small")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per run (all ranks)")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    args = dict(batch=a.batch, prompt=a.prompt, new=a.new, repeats=a.repeats)
    from qwen2vl.parallel import launch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device("cpu"):
            Qwen2VLForConditionalGeneration(make_config(a.config)).to(getattr(torch, dtype)).save_pretrained(tmp)
        for n in a.tp:
            if a.device == "cuda" and n > torch.cuda.device_count():
                print(f"TP={n}: skipped, only {torch.cuda.device_count()} CUDA device(s)")
                continue
            if n == 1:
                torch.set_num_threads(a.threads)
                model = Qwen2VLForConditionalGeneration.from_pretrained(tmp, dtype=dtype, device_map=a.device,
                                                                        progress=False)
                res = decode_rate(model, **args)
                res["param_bytes_rank"] = sum(p.numel() * p.element_size() for p in model.parameters())
                del model
            else:
                res = launch(_tp_rank, n, (tmp, dtype, a.device, args), num_threads=max(1, a.threads // n))
            results[n] = res
            print(f"TP={n}: decode {res['decode_tok_s']:.1f} tok/s, prefill {res['prefill_s'] * 1e3:.1f} ms, "
                  f"params/rank {res['param_bytes_rank'] / 2 ** 20:.1f} MiB", flush=True)
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"{platform.processor() or 'cpu'} " \
                                                                   f"({a.threads} threads in all)"
    same = len({tuple(r["last_tokens"]) for r in results.values()}) <= 1
    print(json.dumps({"device": dev, "dtype": dtype, "config": a.config, **args, "same_tokens": same,
                      "tok_s": {n: round(r["decode_tok_s"], 2) for n, r in results.items()}}))


if __name__ == "__main__":
    main()
