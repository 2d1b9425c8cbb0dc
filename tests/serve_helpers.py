"""Shared pieces of the server hardening tests: a real server on 127.0.0.1 over the tiny checkpoint, a tiny local
HTTP server standing in for remote media hosts, a 1000-frame 720p video built in milliseconds, peak-RSS probes."""
from __future__ import annotations

import argparse
import io
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from qwen2vl.server import ServerThread, add_arguments, build_engine, create_app, settings_from
from test_engine import build_model_dir
from test_server import data_url, image_msg, wait_for  # noqa: F401 (re-exported)
from test_server import png as _png

NAME = "tiny-vl"
KEY = "test-key"
HI = [{"role": "user", "content": "Say something."}]


def png(color=(200, 30, 30), size=(56, 56)) -> bytes:
    return _png(color, size)


def parse(model_dir, *extra) -> argparse.Namespace:
    argv = ["--model", str(model_dir), "--served-model-name", NAME, "--max-num-seqs", "8", "--max-model-len", "1024",
            "--api-key", KEY, *extra]
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def start(model_dir, *extra, engine=None):
    """(server thread, engine) for these CLI flags; pass `engine` to serve another app over the same engine."""
    args = parse(model_dir, *extra)
    engine = engine or build_engine(args)
    return ServerThread(create_app(engine, settings_from(args, engine))).start(), engine


def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    build_model_dir(str(path))
    return path


def post(url: str, body: dict | None = None, *, raw: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> httpx.Response:
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    import json

    content = raw if raw is not None else json.dumps({"model": NAME, **(body or {})}).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, headers=h, timeout=timeout)


def greedy(url: str, messages=HI, max_tokens: int = 6, **extra) -> str:
    r = post(url, {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text[:300]
    return r.json()["choices"][0]["message"]["content"]


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:400])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert "Traceback" not in resp.text and "/tmp/" not in resp.text and "/work/" not in resp.text, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------------------------------------------ memory probes
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


@contextmanager
def peak_rss_growth():
    """Yields a list that receives the growth of the peak RSS (bytes) over the RSS at entry."""
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base, out = _status("VmRSS"), []
    yield out
    out.append(_status("VmHWM") - base)


# ------------------------------------------------------------------------------------------------ media
def long_video(frames: int = 1000, width: int = 1280, height: int = 720, fps: int = 25) -> bytes:
    """An H.264 MP4 of `frames` identical frames: one keyframe and one skip frame muxed `frames - 1` times
    (tens of KB, built in milliseconds; every frame decodes to width x height)."""
    import av
    import numpy as np

    src = io.BytesIO()
    with av.open(src, "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"preset": "ultrafast", "bframes": "0"}
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        for _ in range(3):
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    src.seek(0)
    out = io.BytesIO()
    with av.open(src) as ic, av.open(out, "w", format="mp4") as oc:
        ist = ic.streams.video[0]
        ost = oc.add_stream_from_template(ist)
        key, skip = [p for p in ic.demux(ist) if p.size][:2]
        step = skip.pts - key.pts
        for i in range(frames):
            p = key if i == 0 else skip
            p.stream, p.pts, p.dts = ost, i * step, i * step
            oc.mux(p)
    return out.getvalue()


class StandIn:
    """A local HTTP server playing remote media hosts: `routes[path] = callable(handler)`; `hits` lists paths."""

    def __init__(self):
        self.routes, self.hits = {}, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_bytes(data: bytes, ctype: str = "image/png", length: bool = True):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return route


def redirect(location: str):
    def route(h):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def trickle(data: bytes, every: float):
    """Sends one byte every `every` seconds (the slow-loris media host)."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for b in data:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(every)
    return route
