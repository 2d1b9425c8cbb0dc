"""Multi-turn speed through the server (issue #23), not a test: random weights of the real 2B shape (bf16), the
real 2B tokenizer / chat template / processor from ../shared, one in-process `qwen2vl serve` on 127.0.0.1.

1. A 4-turn chat about one 1024x768 picture (streamed; each turn sends the whole history, as OpenAI clients do):
   time to first token per turn, with the vision + KV prefix caches on and off. Goal: turns 2-4 <= 10 % of turn 1.
2. Four streams decoding; a new 1024x768 request arrives: the streams' inter-token latency while it is encoded
   and prefilled (chunked prefill: `--budget-ms`, default auto = one decode step's time, and / or `--chunk` tokens)
   against their median before it. Goal: p99 during <= 3x the median before. Needs a quiet machine.
3. `--unit-costs` (instead of 1 and 2; meaningful on a busy machine too): in one process, the cost of every unit of
   the 1024x768 picture's vision job (patch embedding, 2 blocks, merger: every block has the same units) and of
   16 / 32-token text chunks, each measured right after a 4-stream decode step, as a ratio to that step. With a
   time budget of one decode step, a step during a prefill costs at most ~2 decode steps + the largest unit.

    python benchmarks/bench_multiturn.py [--threads 2] [--budget-ms auto] [--chunk N] [--config small] [--skip-chat]
                                         [--unit-costs] [--model-dir D]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if p.is_dir()), ROOT.parent / "shared")
META = SHARED / "qwen2-vl" / "Qwen2-VL-2B-Instruct"
QUESTIONS = ["Describe this picture.", "What colours are in it?", "Is there any text?", "Summarize it in one line."]


def build_model(path: Path, small: bool) -> None:
    from qwen2vl.configuration import Qwen2VLConfig
    from qwen2vl.model import Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig.from_pretrained(str(META))
    if small:  # a quick smoke run of the benchmark itself
        config.text_config.num_hidden_layers, config.vision_config.depth = 2, 2
        config.text_config.layer_types = config.text_config.layer_types[:2]
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval().save_pretrained(path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json",
                 "preprocessor_config.json", "generation_config.json"):
        shutil.copy(META / name, path / name)


def picture_url(seed: int, size=(1024, 768)) -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (size[1] // 16, size[0] // 16, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def stream(client, url: str, body: dict, on_token=None) -> tuple[float, str]:
    """POST a streamed chat completion; returns (time to first token, text); on_token(t) per content chunk."""
    t0, ttft, text = time.perf_counter(), None, []
    async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                now = time.perf_counter()
                ttft = now - t0 if ttft is None else ttft
                text.append(delta)
                if on_token:
                    on_token(now)
    return ttft, "".join(text)


async def chat_turns(url: str, picture: str, max_tokens: int) -> list[float]:
    import httpx

    history, ttfts = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for i, q in enumerate(QUESTIONS):
            content = ([{"type": "image_url", "image_url": {"url": picture}}] if i == 0 else []) + \
                      [{"type": "text", "text": q}]
            history.append({"role": "user", "content": content})
            ttft, answer = await stream(client, url, {"messages": history, "max_tokens": max_tokens,
                                                      "temperature": 0})
            history.append({"role": "assistant", "content": answer})
            ttfts.append(ttft)
    return ttfts


def unit_costs(model_dir: Path, picture: str, blocks: int = 2) -> None:
    """Part 3: each vision unit's and text chunk's time / the 4-stream decode step just before it (same process)."""
    import copy

    from PIL import Image

    from qwen2vl.engine import LLMEngine, SamplingParams
    from qwen2vl.engine.llm import load_processor
    from qwen2vl.engine.model_setup import load_model
    from qwen2vl.model.vision_job import VisionEncodeJob, make_choices

    model, processor = load_model(str(model_dir), dtype="bfloat16"), load_processor(str(model_dir))
    engine = LLMEngine(model, processor, max_num_seqs=8, max_model_len=4096, eos_token_ids=[],
                       enable_prefix_caching=False, max_prefill_tokens_per_step=16)
    timed: dict[str, list[float]] = {"decode": [], "prefill": []}
    for name in timed:  # wrap the runner's calls with a stopwatch
        def stopwatch(*a, _call=getattr(engine.runner, name), _log=timed[name], **kw):
            t0 = time.perf_counter()
            out = _call(*a, **kw)
            _log.append(time.perf_counter() - t0)
            return out
        setattr(engine.runner, name, stopwatch)
    tok = engine.tokenizer
    for i in range(4):
        engine.add_request({"prompt_token_ids": tok.encode(f"Count slowly from {i}.")},
                           SamplingParams(max_tokens=4000, ignore_eos=True))
    for _ in range(8):  # the streams' prefill and a few decode steps (warm)
        engine.step()
    image = Image.open(io.BytesIO(base64.b64decode(picture.split(",", 1)[1])))
    pp = engine.process_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": "Describe it."}]}])
    px, grid = pp.mm.pixel_values.to(torch.bfloat16), pp.mm.image_grid_thw
    visual = copy.copy(model.visual)  # the same tower with `blocks` blocks: every block has the same units
    visual._modules = dict(visual._modules, blocks=visual.blocks[:blocks])
    with torch.inference_mode():
        make_choices(visual, int(grid.prod(-1).sum()))
        job = VisionEncodeJob(visual, px, grid)
        rows = []
        while not job.done:
            engine.step()
            flops, kind = job.next_unit
            t0 = time.perf_counter()
            job.run(0)  # exactly one unit
            rows.append((time.perf_counter() - t0, timed["decode"][-1], kind, flops))
    decode_ms = 1000 * statistics.median(r[1] for r in rows)
    print(f"  vision job of a {int(grid.prod())}-patch picture, patch embedding + {blocks} blocks + merger: "
          f"{len(rows)} units, each timed after a 4-stream decode step (median {decode_ms:.0f} ms)")
    worst = {}
    for kind in sorted({r[2] for r in rows}):
        ratios = sorted(r[0] / r[1] for r in rows if r[2] == kind)
        top = max((r for r in rows if r[2] == kind), key=lambda r: r[0] / r[1])
        worst[kind] = ratios[-1]
        print(f"| {kind} units / decode step | median {statistics.median(ratios):.2f}x, max {ratios[-1]:.2f}x "
              f"({1000 * top[0]:.0f} ms, {top[3] / 1e9:.2f} GF vs {1000 * top[1]:.0f} ms) | {len(ratios)} units |")
    text = {}
    for n in (16, 32):
        engine.budget.tokens = n
        timed["prefill"].clear()
        big = engine.add_request({"prompt_token_ids": tok.encode("lorem ipsum " * 200)[:20 * n]},
                                 SamplingParams(max_tokens=1))
        gaps = []
        while big.first_token_time is None:
            engine.step()
            gaps.append(timed["prefill"][-1] / timed["decode"][-1])
        text[n] = statistics.median(gaps)
        print(f"| {n}-token text chunk / decode step | median {text[n]:.2f}x, max {max(gaps):.2f}x | "
              f"{len(gaps)} chunks |")
    largest = max(worst.values())
    print(f"| largest vision unit / 4-stream decode step | {largest:.2f}x | goal < 1 (a step with a budget of one "
          f"decode step then costs <= {2 + largest:.2f}x a decode step; 3x allowed) | "
          f"{'PASS' if largest < 1 else 'FAIL'} |")
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)


async def itl_under_prefill(url: str, picture: str, warm_s: float) -> tuple[list[float], list[float], float]:
    """Inter-token gaps of 4 streams before and during a big picture's encoding + prefill."""
    import httpx

    stamps: list[list[float]] = [[] for _ in range(4)]
    window = {}
    async with httpx.AsyncClient(timeout=600) as client:
        body = {"max_tokens": 4000, "temperature": 0, "ignore_eos": True}
        streams = [asyncio.create_task(stream(client, url, {**body, "messages": [
            {"role": "user", "content": f"Count slowly from {i}."}]}, stamps[i].append)) for i in range(4)]
        while min(len(s) for s in stamps) < 3:
            await asyncio.sleep(0.05)
        await asyncio.sleep(warm_s)
        window["start"] = time.perf_counter()
        ttft, _ = await stream(client, url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "Describe it."}]}],
            "max_tokens": 1, "temperature": 0})
        window["end"] = time.perf_counter()
        for t in streams:
            t.cancel()
    before, during = [], []
    for s in stamps:
        for a, b in zip(s, s[1:]):
            if b <= window["start"]:
                before.append(b - a)
            elif a >= window["start"] and b <= window["end"] + 0.5:
                during.append(b - a)
    return before, during, ttft


def serve(model_dir: Path, extra: list[str]):
    import argparse as ap

    from qwen2vl.server import ServerThread, add_arguments, build_engine, create_app, settings_from

    args = add_arguments(ap.ArgumentParser()).parse_args(
        ["--model", str(model_dir), "--max-num-seqs", "8", "--max-model-len", "4096", "--dtype", "bfloat16",
         "--max-image-pixels", "2000000", "--log-level", "warning", *extra])
    engine = build_engine(args)
    return engine, ServerThread(create_app(engine, settings_from(args, engine))).start()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="--max-prefill-tokens-per-step for part 2")
    ap.add_argument("--budget-ms", default="auto", help="--max-prefill-ms-per-step for part 2 ('none': off)")
    ap.add_argument("--unit-costs", action="store_true", help="part 3 only: unit costs / decode step, in process")
    ap.add_argument("--max-tokens", type=int, default=8, help="answer length per chat turn")
    ap.add_argument("--config", default="2b", choices=["2b", "small"])
    ap.add_argument("--skip-chat", action="store_true", help="only part 2 (inter-token latency under a prefill)")
    ap.add_argument("--model-dir", help="keep the random checkpoint here and reuse it on later runs (built if "
                                        "missing; the build needs ~9 GB of memory for a minute)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}", flush=True)
    picture = picture_url(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or tmp)
        if not (model_dir / "config.json").is_file():
            model_dir.mkdir(parents=True, exist_ok=True)
            build_model(model_dir, args.config == "small")
        if args.unit_costs:
            unit_costs(model_dir, picture_url(1))
            return
        rows = {}
        for label, extra in () if args.skip_chat else (
                ("caches on", []), ("caches off", ["--no-enable-prefix-caching", "--vision-cache-mb", "0"])):
            engine, srv = serve(model_dir, extra)
            try:
                rows[label] = asyncio.run(chat_turns(srv.url, picture, args.max_tokens))
            finally:
                srv.stop()
                engine.shutdown()
            print(f"  4-turn chat, {label}: TTFT per turn " + ", ".join(f"{t:.2f}s" for t in rows[label]), flush=True)
        if rows:
            on = rows["caches on"]
            ratio = max(on[1:]) / on[0]
            print(f"| turns 2-4 TTFT / turn 1 (caches on) | {ratio:.3f} | goal <= 0.10 | "
                  f"{'PASS' if ratio <= 0.10 else 'FAIL'} |")
        budget = ([] if args.chunk is None else ["--max-prefill-tokens-per-step", str(args.chunk)]) + \
            ([] if args.budget_ms == "none" else ["--max-prefill-ms-per-step", args.budget_ms])
        if not budget:
            ap.error("part 2 needs --chunk and / or --budget-ms")
        engine, srv = serve(model_dir, budget)
        try:
            before, during, ttft = asyncio.run(itl_under_prefill(srv.url, picture_url(1), warm_s=5.0))
        finally:
            srv.stop()
            engine.shutdown()
        med = statistics.median(before)
        p99 = sorted(during)[max(0, int(0.99 * len(during)) - 1)] if during else float("nan")
        print(f"  4 streams: median inter-token {1000 * med:.0f} ms before ({len(before)} gaps); during the new "
              f"picture's encode + prefill ({ttft:.1f} s to its first token): p99 {1000 * p99:.0f} ms, "
              f"max {1000 * max(during):.0f} ms ({len(during)} gaps); {' '.join(budget)}")
        print(f"| p99 inter-token latency during a 1024x768 prefill / median before | {p99 / med:.2f}x "
              f"({1000 * p99:.0f} / {1000 * med:.0f} ms, {' '.join(budget)}) | goal <= 3x | "
              f"{'PASS' if p99 / med <= 3 else 'FAIL'} |")


if __name__ == "__main__":
    main()
