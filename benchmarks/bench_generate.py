"""Generation speed: qwen2vl vs transformers on the same random-weight model, in one run.

Measures, per implementation (medians over --repeats after one warm-up):
* TTFT: `generate(max_new_tokens=1)` wall time (vision tower + prefill + first token);
* prefill tokens/s: batch * prompt tokens / TTFT;
* decode tokens/s: batch * (new - 1) / (time of `generate(max_new_tokens=new)` - TTFT).
EOS is an id outside the vocabulary, so both generate exactly --new-tokens tokens (greedy).

    python benchmarks/bench_generate.py                                   # small config, CPU ok, < 1 min
    python benchmarks/bench_generate.py --config ../shared/qwen2-vl/Qwen2-VL-2B-Instruct --dtype bfloat16 \
        --image 448x448 --batch 1 --new-tokens 128 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from qwen2vl.configuration import Qwen2VLConfig  # noqa: E402
from qwen2vl.model import Qwen2VLForConditionalGeneration  # noqa: E402

SMALL = dict(
    text_config=dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 8, 8]}, rope_theta=1e6,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
    vision_config=dict(depth=2, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
    image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003,
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(args):
    from tiny import oracle_from  # the same weights in transformers (test helper)

    config = Qwen2VLConfig.from_pretrained(args.config) if args.config else Qwen2VLConfig(**SMALL)
    config.attn_implementation = args.attn
    torch.manual_seed(0)
    ours = Qwen2VLForConditionalGeneration(config).eval()      # built on CPU, then both models are moved
    ref = oracle_from(ours, attn=args.attn)
    dtype = _DTYPES[args.dtype]
    return ours.to(args.device, dtype), ref.to(args.device, dtype), config


def inputs(args, config):
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()  # noqa: E731
    kw = {}
    ids = text(args.prompt_tokens // 2)
    if args.image:
        w, h = (int(x) for x in args.image.lower().split("x"))
        p, m = config.vision_config.patch_size, config.vision_config.spatial_merge_size
        if w % (p * m) or h % (p * m):
            raise SystemExit(f"--image sides must be multiples of {p * m}")
        grid = [1, h // p, w // p]
        n_tok = grid[1] * grid[2] // m ** 2
        ids += [config.vision_start_token_id] + [config.image_token_id] * n_tok + [config.vision_end_token_id]
        per = torch.randn(grid[1] * grid[2], 3 * config.vision_config.temporal_patch_size * p * p, generator=g)
        kw = dict(pixel_values=per.repeat(args.batch, 1).to(args.device),
                  image_grid_thw=torch.tensor([grid] * args.batch, device=args.device))
    ids += text(args.prompt_tokens - args.prompt_tokens // 2)
    ids = torch.tensor([ids] * args.batch, device=args.device)
    return ids, kw


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def measure(model, ids, kw, args, vocab, oracle):
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=vocab + 7,
                  pad_token_id=0, **kw)
    if oracle:  # transformers 5.x needs the token types next to the grids
        common["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    run = lambda n: model.generate(**common, max_new_tokens=n)  # noqa: E731
    with torch.no_grad():
        run(2)  # warm-up
        firsts, totals, out = [], [], None
        for _ in range(args.repeats):
            firsts.append(timed(lambda: run(1), args.device)[0])
            t, out = timed(lambda: run(args.new_tokens), args.device)
            totals.append(t)
    ttft, total = statistics.median(firsts), statistics.median(totals)
    b, s = ids.shape
    return dict(ttft_ms=1e3 * ttft, prefill_tok_s=b * s / ttft,
                decode_tok_s=b * (args.new_tokens - 1) / max(total - ttft, 1e-9), total_s=total), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="config.json or checkpoint folder (default: a small built-in config)")
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--image", default="112x112", help="WxH in pixels (multiples of 28); '' for text only")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="text tokens around the image")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2")
    ours, ref, config = build(args)
    ids, kw = inputs(args, config)
    vocab = config.text_config.vocab_size
    print(f"device={args.device} dtype={args.dtype} batch={args.batch} prompt={ids.shape[1]} tokens "
          f"image={args.image or '-'} new={args.new_tokens} repeats={args.repeats} "
          f"layers={config.text_config.num_hidden_layers} hidden={config.text_config.hidden_size}")
    a, out_a = measure(ours, ids, kw, args, vocab, oracle=False)
    b, out_b = measure(ref, ids, kw, args, vocab, oracle=True)
    print(f"{'metric':<16}{'qwen2vl':>12}{'transformers':>14}{'ratio':>8}")
    for key, better_high in (("ttft_ms", False), ("prefill_tok_s", True), ("decode_tok_s", True),
                             ("total_s", False)):
        ratio = a[key] / b[key] if better_high else b[key] / a[key]
        print(f"{key:<16}{a[key]:>12.2f}{b[key]:>14.2f}{ratio:>7.2f}x")
    same = torch.equal(out_a.cpu(), out_b.cpu())
    print(f"ratio > 1 means qwen2vl is faster; identical tokens: {same}")


if __name__ == "__main__":
    main()
