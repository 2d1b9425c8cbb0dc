"""Serving benchmark: N concurrent streaming clients against `qwen2vl serve` vs transformers `generate`.

    python benchmarks/bench_serve.py                          # bundled demo model if present, else a random one
    python benchmarks/bench_serve.py --model DIR --num-requests 64 --concurrency 16 --max-tokens 64
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model NAME --skip-baseline

Every request is a chat turn with its own synthetic image (demo shapes) and a fixed number of output tokens
(ignore_eos), so all systems produce the same amount of work. Reported: requests/s, output tokens/s,
TTFT p50/p95 and inter-token latency p50/p95 (gaps between streamed chunks) for the server; the same
requests through transformers `generate` one at a time and as static batches of `--concurrency`
(throughput and per-request latency), and through the offline `qwen2vl.LLM` for reference.
Not a test: numbers depend on the machine (printed first).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2vl.demo import data as demo_data  # noqa: E402


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def build_random_model(path: str, hidden: int = 256, layers: int = 4) -> None:
    """Random-weight Qwen2-VL with the demo tokenizer (when the demo model is not bundled yet)."""
    import json

    from qwen2vl.configuration import Qwen2VLConfig
    from qwen2vl.demo.build_tokenizer import save_demo_tokenizer
    from qwen2vl.model import Qwen2VLForConditionalGeneration

    ids = save_demo_tokenizer(path)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=ids["model_vocab_size"], hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"],
                         eos_token_id=ids["eos_token_id"]),
        vision_config=dict(depth=4, embed_dim=192, hidden_size=hidden, num_heads=6, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 224 * 224,
                   "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}, f)


def make_requests(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = demo_data.make_example(rng, text_only_prob=0.0)
        buf = io.BytesIO()
        ex["image"].save(buf, "PNG")
        out.append((buf.getvalue(), ex["question"]))
    return out


def messages(raw: bytes, question: str, as_url: bool) -> list[dict]:
    if as_url:
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}
    else:
        from PIL import Image

        image = {"type": "image", "image": Image.open(io.BytesIO(raw))}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


# ------------------------------------------------------------------------------------------ server clients
async def run_clients(url: str, model: str, reqs, concurrency: int, max_tokens: int, api_key: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    ttft, gaps, tokens = [], [], 0

    async def one(raw, q):
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            last = None
            stream = await client.chat.completions.create(
                model=model, messages=messages(raw, q, True), max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "skip_special_tokens": False})  # every token streams text
            async for ch in stream:
                if ch.usage is not None:
                    tokens += ch.usage.completion_tokens
                if not ch.choices or not ch.choices[0].delta.content:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t0)
                else:
                    gaps.append(now - last)
                last = now

    t = time.perf_counter()
    await asyncio.gather(*(one(raw, q) for raw, q in reqs))
    wall = time.perf_counter() - t
    await client.close()
    return {"wall": wall, "req_s": len(reqs) / wall, "tok_s": tokens / wall, "ttft": ttft, "gaps": gaps}


# ------------------------------------------------------------------------------------------ baselines
def hf_baseline(model_dir: str, reqs, max_tokens: int, batch: int, dtype) -> dict:
    import transformers

    from qwen2vl.processing.processor import Qwen2VLProcessor

    proc = Qwen2VLProcessor.from_pretrained(model_dir)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    img_id, vid_id = hf.config.image_token_id, hf.config.video_token_id

    def inputs(convs):
        feats = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=len(convs) > 1)
        ids = feats["input_ids"]
        feats["mm_token_type_ids"] = (ids == img_id).long() + 2 * (ids == vid_id).long()
        return dict(feats)

    def gen(convs):
        with torch.inference_mode():
            hf.generate(**inputs(convs), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                        pad_token_id=proc.tokenizer.convert_tokens_to_ids(proc.tokenizer.pad_token))

    convs = [messages(raw, q, False) for raw, q in reqs]
    gen(convs[:1])  # warm-up
    out = {}
    lat = []
    t = time.perf_counter()
    for c in convs:
        t1 = time.perf_counter()
        gen([c])
        lat.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t
    out["one at a time"] = {"req_s": len(convs) / wall, "tok_s": len(convs) * max_tokens / wall, "lat": lat}
    lat = []
    t = time.perf_counter()
    for i in range(0, len(convs), batch):
        t1 = time.perf_counter()
        gen(convs[i:i + batch])
        lat += [time.perf_counter() - t1] * len(convs[i:i + batch])
    wall = time.perf_counter() - t
    out[f"static batch {batch}"] = {"req_s": len(convs) / wall, "tok_s": len(convs) * max_tokens / wall, "lat": lat}
    return out


def offline_llm(model_dir: str, reqs, max_tokens: int, max_num_seqs: int, dtype) -> dict:
    from qwen2vl.engine import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=2048)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"messages": messages(*reqs[0], False)}], sp, use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate([{"messages": messages(raw, q, False)} for raw, q in reqs], sp, use_tqdm=False)
    wall = time.perf_counter() - t
    return {"req_s": len(reqs) / wall, "tok_s": sum(o.num_output_tokens for o in outs) / wall}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir / 'qwen2vl-demo' (default: demo if bundled, else random)")
    ap.add_argument("--url", default=None, help="benchmark an already running server instead of starting one")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {args.threads}, cuda {torch.cuda.is_available()}", flush=True)
    tmp = None
    model = args.model
    if model is None:
        from qwen2vl.loading import demo_model_path

        if (demo_model_path() / "config.json").exists():
            model = "qwen2vl-demo"
        else:
            tmp = tempfile.TemporaryDirectory()
            print("demo model not bundled: building a random-weight model ...", flush=True)
            build_random_model(tmp.name)
            model = tmp.name
    reqs = make_requests(args.num_requests)
    print(f"{args.num_requests} requests, concurrency {args.concurrency}, {args.max_tokens} output tokens each, "
          f"dtype {args.dtype}, model {model}", flush=True)

    if args.url:
        res = asyncio.run(run_clients(args.url, model, reqs, args.concurrency, args.max_tokens, args.api_key))
    else:
        from qwen2vl.server import ServerThread, add_arguments, build_engine, create_app, settings_from

        sargs = add_arguments(argparse.ArgumentParser()).parse_args(
            ["--model", str(model), "--dtype", args.dtype, "--max-num-seqs", str(args.concurrency),
             "--max-model-len", "2048", "--max-queue", str(args.num_requests + 1)])
        engine = build_engine(sargs)
        with ServerThread(create_app(engine, settings_from(sargs, engine))) as server:
            asyncio.run(run_clients(server.url, str(model), reqs[:2], 2, 4, args.api_key))  # warm-up
            res = asyncio.run(run_clients(server.url, str(model), reqs, args.concurrency, args.max_tokens,
                                          args.api_key))
    ms = 1000
    print(f"\nserver ({args.concurrency} concurrent clients, streaming):")
    print(f"  {res['req_s']:.2f} req/s, {res['tok_s']:.1f} output tok/s, wall {res['wall']:.2f}s")
    print(f"  TTFT p50 {pct(res['ttft'], 50) * ms:.1f} ms, p95 {pct(res['ttft'], 95) * ms:.1f} ms; "
          f"inter-token p50 {pct(res['gaps'], 50) * ms:.1f} ms, p95 {pct(res['gaps'], 95) * ms:.1f} ms")
    if not args.skip_baseline and not args.url:
        off = offline_llm(str(model), reqs, args.max_tokens, args.concurrency, dtype)
        print(f"qwen2vl LLM.generate offline (max_num_seqs {args.concurrency}): {off['req_s']:.2f} req/s, "
              f"{off['tok_s']:.1f} tok/s")
        from qwen2vl.loading import resolve_name

        for name, r in hf_baseline(str(resolve_name(model)), reqs, args.max_tokens, args.concurrency,
                                   dtype).items():
            print(f"transformers generate, {name}: {r['req_s']:.2f} req/s, {r['tok_s']:.1f} tok/s, latency "
                  f"p50 {statistics.median(r['lat']) * ms:.0f} ms, p95 {pct(r['lat'], 95) * ms:.0f} ms "
                  f"(server throughput ratio {res['tok_s'] / r['tok_s']:.2f}x)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
