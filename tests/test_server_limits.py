"""Issue 16, memory bounded before work, admission, validation and errors: each finding reproduced on the real
server (127.0.0.1), answered with its 4xx/5xx JSON, the server still serving the control request unchanged."""
from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_helpers import (HI, assert_error, data_url, greedy, image_msg, long_video, model_dir, peak_rss_growth,
                           png, post, start, wait_for)

MB = 1024**2


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    mdir = model_dir(tmp_path_factory)
    server, engine = start(mdir, "--max-image-pixels", "2000000", "--max-images-per-request", "8",
                           "--max-video-frames", "96", "--max-request-bytes", str(4 * MB), "--max-queue", "3",
                           "--body-timeout", "1", "--max-connections", "6")
    url = server.url
    control = greedy(url)
    yield dict(url=url, engine=engine, control=control, server=server)
    server.stop()


def still_serving(srv) -> None:
    assert greedy(srv["url"]) == srv["control"]


def test_video_with_1000_frames_is_sampled_and_resized_as_decoded(srv):
    video = data_url(long_video(1000), "video/mp4")  # 40 s of 1280x720 at 25 fps; all frames kept would be 2.7 GB
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                         {"type": "text", "text": "What happens?"}]}]
    with peak_rss_growth() as grew:
        r = post(srv["url"], {"messages": msgs, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text[:300]
    # qwen-vl-utils' 2 fps: 80 frames, each resized to the 12544-pixel budget (84x140 → 15 tokens per 2 frames)
    assert r.json()["usage"]["prompt_tokens"] > 40 * 15
    assert grew[0] < 300 * MB, grew[0] / MB
    # a frame count over --max-video-frames, and a video whose tokens cannot fit, are refused before decoding
    over = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video, "num_frames": 200}}]}]
    assert_error(post(srv["url"], {"messages": over}), 400)
    with peak_rss_growth() as grew:
        big = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video, "max_pixels": 250000,
                                                                                  "min_pixels": 250000}}]}]
        err = assert_error(post(srv["url"], {"messages": big}), 400)
    assert "tokens" in err["message"] and grew[0] < 100 * MB, (err, grew[0] / MB)
    still_serving(srv)


def test_decode_time_resize_gives_the_same_pixels(tmp_path):
    """Frames resized one by one as they are decoded == the whole stack resized afterwards (today's output)."""
    import av

    from qwen2vl.processing.media import load_video
    from qwen2vl.processing.video_processing import Qwen2VLVideoProcessor

    path = tmp_path / "noise.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        st = c.add_stream("mpeg4", rate=4)
        st.width, st.height, st.pix_fmt = 200, 150, "yuv420p"
        for _ in range(6):
            img = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    proc = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=84 * 84)
    frames, meta = load_video(str(path))
    stacked = proc(frames, video_metadata=meta)
    streamed = proc(path.read_bytes())
    assert stacked["video_grid_thw"].tolist() == streamed["video_grid_thw"].tolist() == [[3, 4, 6]]
    assert np.array_equal(stacked["pixel_values_videos"].numpy(), streamed["pixel_values_videos"].numpy())


def test_pixel_caps_apply_before_any_resize(srv):
    tiny = data_url(png(size=(28, 28)))
    with peak_rss_growth() as grew:
        # 32M-pixel bounds: over --max-image-pixels, refused from the request alone
        assert_error(post(srv["url"], {"messages": image_msg(tiny, min_pixels=32_000_000, max_pixels=32_000_000)}),
                     400)
        # within the cap, but eight 250k-pixel upscales need ~2500 tokens: refused from the headers, undecoded
        eight = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": tiny, "min_pixels": 250000, "max_pixels": 250000}} for _ in range(8)]}]
        err = assert_error(post(srv["url"], {"messages": eight}), 400, "context_length_exceeded")
    assert "vision tokens" in err["message"] and grew[0] < 60 * MB, grew[0] / MB
    still_serving(srv)


def test_long_text_refused_before_tokenization(srv):
    text = "lorem ipsum " * 300_000  # 3.6M characters; context 1024 tokens
    t = time.perf_counter()
    with peak_rss_growth() as grew:
        err = assert_error(post(srv["url"], {"messages": [{"role": "user", "content": text}]}), 400,
                           "context_length_exceeded")
    assert "characters" in err["message"]
    assert time.perf_counter() - t < 5 and grew[0] < 150 * MB, (time.perf_counter() - t, grew[0] / MB)
    still_serving(srv)


def test_admission_counts_requests_from_body_acceptance(srv):
    """Slow preprocessing: requests past --max-queue (3) get 429 + Retry-After while others are still being
    preprocessed (the engine's own queue is empty all along); /health shows the stage."""
    eng = srv["engine"].engine  # the LLMEngine: its public process_prompt is what AsyncEngine.process runs
    fast = eng.process_prompt
    eng.process_prompt = lambda *a, **k: (time.sleep(0.6), fast(*a, **k))[1]
    health = []
    try:
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(post, srv["url"], {"messages": HI, "max_tokens": 2}) for _ in range(8)]
            wait_for(lambda: health.append(post_health(srv)) or health[-1]["preprocessing"] > 0, 5)
            resps = [f.result() for f in futs]
    finally:
        del eng.process_prompt
    codes = sorted(r.status_code for r in resps)
    assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    limited = next(r for r in resps if r.status_code == 429)
    assert_error(limited, 429, "queue_full")
    assert limited.headers["retry-after"] == "1"
    assert max(h["preprocessing"] for h in health) > 0 and health[-1]["waiting"] == 0
    still_serving(srv)


def post_health(srv) -> dict:
    import httpx

    return httpx.get(srv["url"] + "/health").json()


def _stalled_upload(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer test-key\r\nContent-Length: 100000\r\n\r\n{\"messages\": ")
    return s


def test_stalled_uploads_time_out_and_connections_are_capped(srv):
    socks = [_stalled_upload(srv["url"]) for _ in range(6)]
    try:
        assert wait_for(lambda: post_health(srv)["receiving"] == 6, 5)
        # every request slot is held by a stalled upload: the next request is refused at once, in JSON
        assert_error(post(srv["url"], {"messages": HI, "max_tokens": 2}), 503, "too_many_connections")
        # the body timeout (1 s) answers each stalled upload with 408 and closes it
        for s in socks:
            s.settimeout(5)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head
            assert json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        for s in socks:
            s.close()
    assert post_health(srv)["receiving"] == 0
    still_serving(srv)


@pytest.mark.parametrize("extra, raw, needle", [
    ({"stop_token_ids": [-1000000000000]}, None, "stop_token_ids"),
    ({"stop_token_ids": [10**6]}, None, "stop_token_ids"),
    ({"top_k": 1e12}, None, "top_k"),
    (None, b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', "Infinity"),
    # fields that are never silently ignored: refused, or (tools, response_format, logprobs) checked
    ({"functions": [{"name": "f"}]}, None, "not supported"),
    ({"function_call": "auto"}, None, "not supported"),
    ({"tool_choice": "required"}, None, "needs `tools`"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, None,
     "Invalid type: nope"),
    ({"top_logprobs": 2}, None, "requires logprobs"),
])
def test_validation(srv, extra, raw, needle):
    body = {"messages": HI, "max_tokens": 2, **(extra or {})}
    err = assert_error(post(srv["url"], body, raw=raw), 400)
    assert needle in err["message"] or needle == "Infinity" and "not valid JSON" in err["message"], err


def test_sampling_params_refuse_non_finite_and_huge_values():
    from qwen2vl.engine import SamplingParams

    for bad in ({"repetition_penalty": float("inf")}, {"presence_penalty": float("nan")}, {"top_k": 10**12},
                {"stop_token_ids": [-1]}, {"temperature": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(temperature=1e-45).greedy and SamplingParams(temperature=1e-5).temperature == 1e-5


def test_tiny_temperature_is_greedy(srv):
    assert greedy(srv["url"], max_tokens=8) == greedy(srv["url"], max_tokens=8, temperature=1e-45)
    r = post(srv["url"], {"messages": HI, "max_tokens": 8, "temperature": 1e-45, "seed": 1})
    assert r.json()["choices"][0]["message"]["content"] == greedy(srv["url"], max_tokens=8)


@pytest.mark.parametrize("exc, status, code", [
    (RuntimeError("boom in /srv/secret/module.py"), 500, None),
    (MemoryError(), 503, "overloaded"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes"), 503, "overloaded"),
    (OSError(2, "No such file or directory", "/srv/secret/config.json"), 400, None),
])
def test_internal_errors_are_json_logged_and_pathless(srv, caplog, exc, status, code):
    eng = srv["engine"].engine

    def fail(*a, **k):
        raise exc

    eng.process_prompt = fail
    try:
        with caplog.at_level(logging.INFO, logger="qwen2vl.server"):
            resp = post(srv["url"], {"messages": HI, "max_tokens": 2})
    finally:
        del eng.process_prompt
    err = assert_error(resp, status, code)
    assert "/srv/secret" not in resp.text
    if status >= 500:
        rid = resp.headers["x-request-id"]
        assert rid in err["message"]
        assert any(rid in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    if status == 500:
        assert any(r.exc_info for r in caplog.records)  # the traceback is in the log, not the answer
    still_serving(srv)
