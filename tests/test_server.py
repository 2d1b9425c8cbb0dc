"""OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 (random port, background thread) over
a tiny random checkpoint with the demo tokenizer, driven by the official `openai` client (and raw httpx for
malformed bodies / disconnects)."""
from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
from PIL import Image

from qwen2vl.engine import LLM, SamplingParams
from qwen2vl.server import ServerThread, add_arguments, build_engine, create_app, settings_from
from test_engine import build_model_dir

NAME = "tiny-vl"
KEY = "test-key"


def png(color, size=(90, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_msg(url: str, text: str = "What shape is it?", **pixels) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **pixels}},
                                         {"type": "text", "text": text}]}]


def args_for(model_dir, media_dir=None, *extra) -> argparse.Namespace:
    argv = ["--model", str(model_dir), "--served-model-name", NAME, "--max-num-seqs", "8", "--max-model-len", "256",
            "--max-images-per-request", "4", "--max-image-pixels", "250000", "--max-request-bytes", "1000000",
            "--allow-private-media-urls",  # the test serves "remote" media from 127.0.0.1
            *extra]
    if media_dir is not None:
        argv += ["--allowed-local-media-path", str(media_dir)]
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    model_dir, media_dir = root / "model", root / "media"
    model_dir.mkdir()
    media_dir.mkdir()
    build_model_dir(str(model_dir))
    (media_dir / "red.png").write_bytes(png((220, 20, 20)))
    (root / "secret.png").write_bytes(png((0, 0, 0)))
    args = args_for(model_dir, media_dir, "--api-key", KEY)
    engine = build_engine(args)
    server = ServerThread(create_app(engine, settings_from(args, engine))).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    offline = LLM(str(model_dir), max_num_seqs=16, max_model_len=256)
    yield dict(root=root, model_dir=model_dir, media_dir=media_dir, engine=engine, server=server, client=client,
               offline=offline)
    server.stop()


@contextmanager
def slow_decode(async_engine, delay: float = 0.01):
    """Make each decode step take `delay` s so a request is still running when the client acts."""
    runner = async_engine.engine.runner
    fast = runner.decode

    def decode(*a):
        time.sleep(delay)
        return fast(*a)

    runner.decode = decode
    try:
        yield
    finally:
        runner.decode = fast


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def offline_text(setup, images: list[bytes], max_tokens: int, text: str = "What shape is it?") -> list:
    convs = [[{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(raw))},
                                           {"type": "text", "text": text}]}] for raw in images]
    return setup["offline"].generate([{"messages": c} for c in convs],
                                     SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)


def test_generation_config_defaults():
    from types import SimpleNamespace

    from qwen2vl.generation.config import GenerationConfig
    from qwen2vl.server.startup import default_sampling

    hub = GenerationConfig(do_sample=True, temperature=0.01, top_p=0.001, top_k=1, repetition_penalty=1.0)
    assert default_sampling(SimpleNamespace(generation_config=hub)) == {
        "temperature": 0.01, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.0}
    greedy = GenerationConfig(do_sample=False, temperature=0.7, repetition_penalty=1.05)
    assert default_sampling(SimpleNamespace(generation_config=greedy)) == {"temperature": 0.0,
                                                                          "repetition_penalty": 1.05}
    assert default_sampling(SimpleNamespace()) == {}


def test_models_health_auth(setup):
    c, url = setup["client"], setup["server"].url
    assert [m.id for m in c.models.list().data] == [NAME]
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_chat_image_matches_offline_and_stream(setup):
    c, raw = setup["client"], png((30, 200, 40), (120, 80))
    ref = offline_text(setup, [raw], 12)[0]
    r = c.chat.completions.create(model=NAME, messages=image_msg(data_url(raw)), max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids),
                                                                  len(ref.outputs[0].token_ids))
    chunks = list(c.chat.completions.create(model=NAME, messages=image_msg(data_url(raw)), max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.outputs[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.outputs[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    # a file:// image inside the allowed directory works too
    local = c.chat.completions.create(model=NAME, messages=image_msg((setup["media_dir"] / "red.png").as_uri()),
                                      max_tokens=4, temperature=0)
    assert local.usage.completion_tokens == 4


def test_video_and_remote_media(setup, tmp_path):
    import functools
    import http.server

    import av
    import numpy as np

    from qwen2vl.server.media_policy import MediaPolicy, to_conversation
    from qwen2vl.server.protocol import APIError, ChatCompletionRequest

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        st = c.add_stream("mpeg4", rate=4)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    video = {"type": "video_url", "video_url": {"url": data_url(path.read_bytes(), "video/mp4")}}
    msgs = [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]
    r = setup["client"].chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0)
    text_only = setup["client"].chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What happens?"}], max_tokens=1)
    assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens > text_only.usage.prompt_tokens + 4
    two = [{"role": "user", "content": [video, video]}]
    resp = _post(setup["server"].url, {"model": NAME, "messages": two, "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_videos"
    # http(s) URLs are fetched when allowed (default), refused when the policy turns them off
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(setup["media_dir"]))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        remote = f"http://127.0.0.1:{httpd.server_address[1]}/red.png"
        r = setup["client"].chat.completions.create(model=NAME, messages=image_msg(remote), max_tokens=2)
        assert r.usage.completion_tokens == 2
        req = ChatCompletionRequest.model_validate({"messages": image_msg(remote)})
        with pytest.raises(APIError, match="remote URLs is disabled") as e:
            to_conversation(req.messages, MediaPolicy(allow_remote=False))
        assert e.value.status == 400
    finally:
        httpd.shutdown()
        httpd.server_close()
        th.join()


def test_16_concurrent_requests_match_offline(setup):
    c = setup["client"]
    images = [png((16 * i, 255 - 12 * i, (70 * i) % 256), (60 + 8 * (i % 5), 60 + 10 * (i % 3))) for i in range(16)]
    refs = offline_text(setup, images, 8)

    def one(raw):
        return c.chat.completions.create(model=NAME, messages=image_msg(data_url(raw)), max_tokens=8,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, images))
    assert got == [r.outputs[0].text for r in refs]
    assert len(set(got)) > 1
    assert setup["engine"].engine.peak_running > 1  # requests were decoded together


def test_n_stop_and_per_image_pixels(setup):
    c, raw = setup["client"], png((200, 200, 0), (200, 200))
    msgs = image_msg(data_url(raw))
    one = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    two = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, n=2,
                                    extra_body={"ignore_eos": True})
    text = one.choices[0].message.content
    assert [ch.index for ch in two.choices] == [0, 1]
    assert all(ch.message.content == text for ch in two.choices) and two.usage.completion_tokens == 32
    sampled = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=1.0, n=2, seed=3)
    assert len(sampled.choices) == 2
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    small = c.chat.completions.create(model=NAME, messages=image_msg(data_url(raw), max_pixels=56 * 56),
                                      max_tokens=1, temperature=0)
    assert small.usage.prompt_tokens == one.usage.prompt_tokens - (16 - 4)  # 4x4 → 2x2 merged patches


def test_client_disconnect_aborts(setup):
    engine, url = setup["engine"], setup["server"].url
    body = {"model": NAME, "messages": image_msg(data_url(png((1, 2, 3)))), "max_tokens": 200, "stream": True,
            "ignore_eos": True, "temperature": 0, "request_id": "disconnect-stream"}
    auth = {"Authorization": f"Bearer {KEY}"}
    with slow_decode(engine), httpx.Client(timeout=30) as h:
        with h.stream("POST", url + "/v1/chat/completions", json=body, headers=auth) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines), next(lines)
        assert wait_for(lambda: "disconnect-stream" in engine.aborted)
        body.update(stream=False, request_id="disconnect-plain")
        with pytest.raises(httpx.ReadTimeout):
            h.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=0.5)
        assert wait_for(lambda: "disconnect-plain" in engine.aborted)
    assert wait_for(lambda: engine.stats()["running"] == 0)
    assert setup["client"].chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2).usage.completion_tokens >= 1


def _post(url, body, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=30)


def _bad_cases(setup):
    ok = image_msg(data_url(png((5, 5, 5))))
    five = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png((i, 0, 0)))}}
                                         for i in range(5)]}]
    return {
        "malformed json": (None, b'{"model": "tiny-vl", "messages": [', "invalid_json"),
        "not an object": (None, b"[1, 2]", "invalid_json"),
        "nested too deeply": (None, b'{"messages": ' + b"[" * 100_000, "invalid_json"),
        "seed out of range": ({"messages": ok, "seed": 2**70}, None, None),
        "wrong field type": ({"messages": ok, "temperature": "hot"}, None, None),
        "messages not a list": ({"messages": "hello"}, None, None),
        "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, None, None),
        "bad base64": ({"messages": image_msg("data:image/png;base64,!!notbase64!!")}, None, "invalid_image"),
        "undecodable image": ({"messages": image_msg(data_url(b"\x00garbage" * 50))}, None, "invalid_image"),
        "oversized image": ({"messages": image_msg(data_url(png((1, 1, 1), (600, 600))))}, None, "invalid_image"),
        "too many images": ({"messages": five}, None, "too_many_images"),
        "body too large": ({"messages": image_msg(data_url(b"x" * 900_000))}, None, "request_too_large"),
        "context too long": ({"messages": ok, "max_tokens": 1000}, None, "context_length_exceeded"),
        "file outside allowed dir": ({"messages": image_msg((setup["root"] / "secret.png").as_uri())}, None,
                                     "media_not_allowed"),
        "bare path": ({"messages": image_msg(str(setup["media_dir"] / "red.png"))}, None, None),
        "bad n": ({"messages": ok, "n": 0}, None, None),
        "min > max pixels": ({"messages": image_msg(data_url(png((5, 5, 5))), min_pixels=9000, max_pixels=3000)},
                             None, None),
    }


def test_bad_inputs_get_400_and_server_keeps_serving(setup):
    url = setup["server"].url
    for name, (body, raw, code) in _bad_cases(setup).items():
        resp = _post(url, {"model": NAME, "max_tokens": 4, **(body or {})}, raw)
        assert resp.status_code == 400, (name, resp.status_code, resp.text[:300])
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", name
        assert "Traceback" not in resp.text and len(resp.text) < 2000, name
        if code is not None:
            assert err["code"] == code, (name, err)
    engine = setup["engine"]
    engine.max_queue = 0  # every new request finds the queue full
    try:
        with pytest.raises(openai.RateLimitError):
            setup["client"].chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2)
    finally:
        engine.max_queue = None
    r = setup["client"].chat.completions.create(model=NAME, messages=image_msg(data_url(png((9, 9, 9)))),
                                                max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_graceful_shutdown_leaves_no_threads(setup):
    args = args_for(setup["model_dir"])
    engine = build_engine(args)
    server = ServerThread(create_app(engine, settings_from(args, engine))).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    chunks = []

    def stream():
        for ch in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=100, stream=True, extra_body={"ignore_eos": True}):
            chunks.append(ch)

    t = threading.Thread(target=stream)
    with slow_decode(engine, 0.005):
        t.start()
        assert wait_for(lambda: len(chunks) > 2)
        server.stop()  # uvicorn lets the running request finish, then the lifespan shuts the engine down
        t.join(30)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert not server.thread.is_alive() and not engine.is_running
    assert engine.threads() and not [th.name for th in engine.threads() if th.is_alive()]
