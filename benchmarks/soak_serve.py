"""Soak test of `qwen2vl serve` (not a unit test): minutes of mixed traffic on loopback at bounded concurrency.

    python benchmarks/soak_serve.py                        # 2 minutes, 8 clients, small random model
    python benchmarks/soak_serve.py --seconds 30 --concurrency 4

Traffic (seeded mix): greedy text, images as data URLs and as URLs on a local stand-in host, a short video,
streams, streams the client drops after two events, malformed / invalid requests (400 expected), images from a
host sending one byte every 0.5 s (400 after the media deadline). The server runs in this process on 127.0.0.1
with `--allow-private-media-urls` (the stand-in host is local); nothing leaves the machine.

Printed: requests/s, p50/p99 latency of completed requests, counts by status (goal: 0 5xx), RSS after warm-up
(first quarter of the run) and at the end (goal: < 10 % growth), and whether every greedy answer equals the same
request sent alone afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_serve import build_random_model, pct  # noqa: E402
from serve_helpers import (StandIn, data_url, image_msg, long_video, parse, png, serve_bytes,  # noqa: E402
                           trickle)

KEY = "test-key"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def payloads(stand_in: StandIn) -> dict[str, dict]:
    """Named request bodies; the greedy ones ('g-...') are compared with the same request sent alone."""
    video = {"type": "video_url", "video_url": {"url": data_url(long_video(48, 320, 240, 8), "video/mp4")}}
    out = {}
    for i in range(4):
        out[f"g-text-{i}"] = {"messages": [{"role": "user", "content": f"Tell me about number {i}."}]}
        out[f"g-image-{i}"] = {"messages": image_msg(data_url(png((60 * i, 90, 200 - 40 * i), (56 + 28 * i, 84))))}
        stand_in.routes[f"/img{i}.png"] = serve_bytes(png((30, 60 * i, 90), (84, 56 + 28 * i)))
        out[f"g-remote-{i}"] = {"messages": image_msg(stand_in.url(f"/img{i}.png"))}
    out["g-video"] = {"messages": [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]}
    for body in out.values():
        body.update(max_tokens=8, temperature=0)
    stand_in.routes["/slow.png"] = trickle(png(), 0.5)
    out["slow-url"] = {"messages": image_msg(stand_in.url("/slow.png")), "max_tokens": 4}
    out["bad-temperature"] = {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}
    out["bad-stop-ids"] = {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [-5]}
    return out


async def one(client: httpx.AsyncClient, name: str, body: dict, stream: bool, drop: bool) -> tuple[int, str | None]:
    if name == "malformed":
        r = await client.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type":
                                                                                         "application/json"})
        return r.status_code, None
    body = {"model": "soak", **body, "stream": stream}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
        return r.status_code, text
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        parts, events = [], 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            if drop and events >= 2:
                return 299, None  # our own marker: dropped on purpose
            ev = json.loads(line[6:])
            if "error" in ev:
                return 500, None
            parts += [c["delta"].get("content") or "" for c in ev["choices"]]
        return 200, "".join(parts)


async def soak(url: str, bodies: dict, seconds: float, concurrency: int, seed: int):
    rng = random.Random(seed)
    names = list(bodies) + ["malformed"]
    weights = [1 if n.startswith("g-") else 0.4 for n in bodies] + [0.4]
    stats, answers, lat = Counter(), {}, []
    rss = {"start": rss_mb()}
    t_end = time.monotonic() + seconds
    warm_at = time.monotonic() + seconds / 4

    async def worker(client):
        while time.monotonic() < t_end:
            name = rng.choices(names, weights)[0]
            stream, drop = rng.random() < 0.3, rng.random() < 0.15
            t0 = time.perf_counter()
            try:
                status, text = await one(client, name, bodies.get(name, {}), stream, drop)
            except httpx.HTTPError as e:
                status, text = f"client {type(e).__name__}", None
            stats[status] += 1
            if status == 200:
                lat.append(time.perf_counter() - t0)
            if text is not None and name.startswith("g-"):
                answers.setdefault(name, set()).add(text)
            if "warm" not in rss and time.monotonic() > warm_at:
                rss["warm"] = rss_mb()

    headers = {"Authorization": f"Bearer {KEY}"}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, timeout=60) for _ in range(concurrency)]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    took = time.perf_counter() - t0
    for c in clients:
        await c.aclose()
    rss["end"] = rss_mb()
    return stats, answers, lat, rss, took


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from qwen2vl.server import ServerThread, build_engine, create_app, settings_from

    tmp = tempfile.mkdtemp(prefix="soak-")
    build_random_model(tmp, hidden=256, layers=2)
    sargs = parse(tmp, "--allow-private-media-urls", "--media-timeout", "2", "--max-queue", "64")
    sargs.served_model_name = "soak"
    engine = build_engine(sargs)
    server = ServerThread(create_app(engine, settings_from(sargs, engine))).start()
    stand_in = StandIn()
    bodies = payloads(stand_in)
    print(f"soak: {args.seconds:.0f} s, {args.concurrency} clients, {len(bodies) + 1} request kinds, "
          f"server {server.url} (threads: {threading.active_count()})")
    try:
        stats, answers, lat, rss, took = asyncio.run(soak(server.url, bodies, args.seconds, args.concurrency,
                                                          args.seed))
        alone = {}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            for name in answers:
                r = c.post("/v1/chat/completions", json={"model": "soak", **bodies[name]})
                alone[name] = r.json()["choices"][0]["message"]["content"]
    finally:
        stand_in.close()
        server.stop()
    total = sum(stats.values())
    five = sum(v for k, v in stats.items() if isinstance(k, int) and k >= 500)
    mismatched = [n for n, seen in answers.items() if seen != {alone[n]}]
    print(f"requests: {total} in {took:.1f} s = {total / took:.2f} req/s")
    print(f"latency of 200s: p50 {pct(lat, 50) * 1000:.0f} ms, p99 {pct(lat, 99) * 1000:.0f} ms "
          f"(mean {statistics.fmean(lat) * 1000:.0f} ms, n={len(lat)})" if lat else "no completed requests")
    print("by status:", dict(sorted(stats.items(), key=lambda kv: str(kv[0]))), "(299 = stream dropped by client)")
    print(f"5xx: {five}")
    warm = rss.get("warm", rss["start"])
    print(f"RSS: start {rss['start']:.0f} MB, after warm-up {warm:.0f} MB, end {rss['end']:.0f} MB, "
          f"growth after warm-up {100 * (rss['end'] - warm) / warm:+.1f} %")
    print(f"greedy answers equal to the request sent alone: {len(answers) - len(mismatched)}/{len(answers)}"
          + (f" (mismatched: {mismatched})" if mismatched else ""))


if __name__ == "__main__":
    main()
