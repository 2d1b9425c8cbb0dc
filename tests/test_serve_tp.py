"""Engine and server under tensor parallelism (issue #8) on 2 CPU ranks (gloo, 1 thread per rank).

* `LLM(path, tensor_parallel_size=2)` in this process (rank 0 + one spawned worker) gives the single-process
  greedy outputs (text + image prompts, n=2 row copies, a second batch after rows were released);
* `python -m qwen2vl.server --tensor-parallel-size 2` serves the same greedy chat completions as the offline
  single-process engine (image and streamed text requests at once), and Ctrl-C on its process group or SIGTERM
  to rank 0 stops it with exit code 0 leaving no child process behind;
* a tensor-parallel size that does not divide the model fails with a clear message before any rank starts.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from qwen2vl.engine import LLM, SamplingParams
from qwen2vl.server import add_arguments, run
from test_engine import build_model_dir
from test_server import data_url, image_msg, png

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0, max_tokens=10)
TEXT_MSG = [{"role": "user", "content": "Tell me a story about a red square."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp_serve_model")
    build_model_dir(str(d), intermediate_size=36)   # heads 4, kv heads 2, mlp 36: splits over 2 ranks
    return d


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), max_num_seqs=4, max_model_len=256)


def _texts(outs):
    return [[c.text for c in o.outputs] for o in outs]


def test_llm_tensor_parallel_matches_single_process(model_dir, offline):
    img = image_msg(data_url(png((220, 20, 20))))
    prompts = [{"messages": img}, {"messages": TEXT_MSG}, "a b c d"]
    params = [GREEDY, GREEDY.clone(n=2), GREEDY]
    want = offline.generate(prompts, params, use_tqdm=False)
    # chunked prefill here (the served test below runs whole prompts): every rank encodes the picture in the
    # same slices between steps (vision jobs mirrored like the prefill) and the answers stay the same
    with LLM(str(model_dir), max_num_seqs=4, max_model_len=256, tensor_parallel_size=2, tp_num_threads=1,
             max_prefill_tokens_per_step=8) as llm:
        assert llm.model.tp_world_size == 2
        assert llm.engine.pool.cache.keys[0].shape[1] == 1          # this rank caches 1 of the 2 kv heads
        got = llm.generate(prompts, params, use_tqdm=False)
        again = llm.generate(prompts[::-1], params[::-1], use_tqdm=False)   # rows reused after release
        procs = llm._tp.procs
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert _texts(again) == _texts(want)[::-1]
    # the second batch's prompts came from the prefix cache, whose KV every rank stashed and restored alike
    assert sum(o.num_cached_tokens for o in again) > 0 and sum(o.num_cached_tokens for o in got) == 0
    assert llm.engine.stats()["vision_cache_misses"] == 1   # encoded once, by a vision job
    assert all(not p.is_alive() for p in procs)


def test_bad_tensor_parallel_size_is_a_clear_error(model_dir):
    argv = ["--model", str(model_dir), "--tensor-parallel-size", "3"]
    with pytest.raises(SystemExit, match="num_attention_heads=4"):
        run(add_arguments(argparse.ArgumentParser()).parse_args(argv))


# ----------------------------------------------------------------------------------------------- the server
def _children(pid: int) -> set[int]:
    """All live descendants of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(url: str, messages, stream: bool = False) -> str:
    body = {"model": "tiny-tp", "messages": messages, "temperature": 0, "max_tokens": 10, "stream": stream}
    with httpx.Client(timeout=60) as client:
        if not stream:
            r = client.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        import json

        text = ""
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for ch in json.loads(line[6:])["choices"]:
                        text += ch["delta"].get("content") or ""
        return text


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_serve_tensor_parallel_matches_offline_and_stops_cleanly(model_dir, offline, stop):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "qwen2vl.server", "--model", str(model_dir), "--served-model-name", "tiny-tp",
           "--port", str(port), "--tensor-parallel-size", "2", "--tp-num-threads", "1", "--device", "cpu",
           "--max-num-seqs", "4", "--max-model-len", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)   # its own process group: Ctrl-C goes to every rank
    url = f"http://127.0.0.1:{port}"
    try:
        img = image_msg(data_url(png((20, 20, 220))))
        want = _texts(offline.chat([img, TEXT_MSG], GREEDY, use_tqdm=False))
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the tensor-parallel server did not come up"
            time.sleep(0.2)
        kids = _children(proc.pid)
        assert kids, "expected a spawned worker rank"
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda a: _chat(url, *a), [(img, False), (TEXT_MSG, True)]))
        assert got == [w[0] for w in want]
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)      # as Ctrl-C in a terminal: every rank gets it
        else:
            proc.send_signal(signal.SIGTERM)        # as a process manager: rank 0 only
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "child processes outlived the server"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
