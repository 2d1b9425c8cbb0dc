"""Issue 16, what the server reaches and who can drive it: SSRF defaults, slow/huge media hosts, redirects,
CSRF / DNS rebinding, CORS, local files opened without following links. A tiny local HTTP server stands in for
remote hosts (so the tests that need it turn --allow-private-media-urls on; the refusals run with it off)."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_helpers import (HI, KEY, StandIn, assert_error, greedy, image_msg, model_dir, png, post,
                           redirect, serve_bytes, start, trickle)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mdir = model_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("files")
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    (media / "red.png").write_bytes(png((220, 20, 20), (56, 56)))
    (outside / "secret.png").write_bytes(png((0, 0, 0), (224, 224)))  # more tokens: a leak would show
    strict, engine = start(mdir, "--allowed-local-media-path", str(media))
    lax, _ = start(mdir, "--allow-private-media-urls", "--media-timeout", "1.5", "--max-image-bytes", "5000",
                   engine=engine)
    stand_in = StandIn()
    stand_in.routes["/red.png"] = serve_bytes(png((220, 20, 20), (56, 56)))
    yield dict(strict=strict.url, lax=lax.url, media=media, outside=outside, stand_in=stand_in, engine=engine,
               control=greedy(strict.url))
    stand_in.close()
    lax.stop()
    strict.stop()


def still_serving(env) -> None:
    assert greedy(env["strict"]) == env["control"] and greedy(env["lax"]) == env["control"]


def test_private_addresses_are_refused_by_default(env):
    s = env["stand_in"]
    port = s.port
    forms = ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001", "[::1]", "[::ffff:127.0.0.1]",
             "0.0.0.0", "169.254.169.254", "10.0.0.1", "192.168.1.1", "[fe80::1]", "224.0.0.1"]
    for host in forms:
        err = assert_error(post(env["strict"], {"messages": image_msg(f"http://{host}:{port}/red.png")}), 400,
                           "media_not_allowed")
        assert "private" in err["message"] or "reserved" in err["message"], (host, err)
    assert s.hits == []  # nothing was ever fetched
    ok = post(env["lax"], {"messages": image_msg(s.url("/red.png")), "max_tokens": 2})
    assert ok.status_code == 200 and s.hits == ["/red.png"]
    still_serving(env)


def test_address_classification():
    from qwen2vl.server.fetch import is_public

    public = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"]
    private = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
               "::ffff:8.8.8.8", "::ffff:127.0.0.1", "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:3fff:fdd2"]
    assert all(is_public(ipaddress.ip_address(a)) for a in public)
    assert not [a for a in private if is_public(ipaddress.ip_address(a))]


def test_redirects_are_checked_at_every_hop(env, tmp_path_factory):
    """With an allowlist of 'localhost', a redirect to 127.0.0.1 (another host) is refused; loops stop after 3."""
    from qwen2vl.server.fetch import FetchError, FetchPolicy, MediaFetcher

    s = env["stand_in"]
    s.routes["/hop"] = redirect(s.url("/red.png"))
    s.routes["/loop"] = redirect("/loop")
    fetcher = MediaFetcher(FetchPolicy(allow_private=True, allowed_domains=("localhost",)))
    s.hits.clear()
    with pytest.raises(FetchError, match="allowed-media-domains") as e:
        asyncio.run(fetcher.fetch(s.url("/hop", host="localhost"), 10_000))
    assert e.value.code == "media_not_allowed" and s.hits == ["/hop"]
    before = len(s.hits)
    err = assert_error(post(env["lax"], {"messages": image_msg(s.url("/loop"))}), 400, "media_fetch_failed")
    assert len(s.hits) - before == 4 and "could not fetch" in err["message"]  # the URL + 3 redirects


def test_network_failures_look_the_same(env):
    s = env["stand_in"]
    with __import__("socket").socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    s.routes["/reset.png"] = lambda h: h.connection.close()  # closes without an answer
    urls = [s.url("/missing.png"), f"http://127.0.0.1:{closed}/x.png", s.url("/reset.png")]
    messages = {assert_error(post(env["lax"], {"messages": image_msg(u)}), 400, "media_fetch_failed")["message"]
                for u in urls}
    assert len(messages) == 1, messages


def test_slow_and_huge_media_hosts(env):
    """One byte every 0.4 s: only that request waits, up to the 1.5 s deadline; a body over the byte cap is
    stopped while streaming (no Content-Length to trust)."""
    s = env["stand_in"]
    s.routes["/slow.png"] = trickle(png(), 0.4)
    s.routes["/huge.png"] = serve_bytes(os.urandom(50_000), length=False)
    with ThreadPoolExecutor(3) as pool:
        t0 = time.perf_counter()
        slow = [pool.submit(post, env["lax"], {"messages": image_msg(s.url("/slow.png"))}) for _ in range(2)]
        time.sleep(0.3)
        t1 = time.perf_counter()
        assert greedy(env["lax"]) == env["control"]
        fast_took = time.perf_counter() - t1
        for f in slow:
            assert_error(f.result(), 400, "media_fetch_failed")
        slow_took = time.perf_counter() - t0
    assert fast_took < 1.2 and 1.4 < slow_took < 6, (fast_took, slow_took)  # the fast one never waited
    assert_error(post(env["lax"], {"messages": image_msg(s.url("/huge.png"))}), 400, "media_too_large")
    still_serving(env)


def test_csrf_and_dns_rebinding_are_refused(env):
    url = env["strict"]
    body = b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    auth = {"Authorization": f"Bearer {KEY}"}
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**auth, **({"Content-Type": ctype} if ctype else {})}
        r = httpx.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert_error(r, 415, "unsupported_media_type")
    r = post(url, {"messages": HI, "max_tokens": 2}, headers={"Host": "evil.example:8000"})
    assert_error(r, 400, "invalid_host")
    r = post(url, {"messages": HI, "max_tokens": 2}, headers={"Host": "localhost", "Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # CORS off by default
    still_serving(env)


def test_cors_only_for_allowed_origins():
    from starlette.testclient import TestClient

    from qwen2vl.server import ServerSettings, create_app

    class FakeEngine:  # create_app only reads these until a request reaches the engine
        max_queue = 4
        engine = type("E", (), {"pool": type("P", (), {"num_free": 1, "max_num_seqs": 1})(), "model": None})()

        def stats(self):
            return {"running": 0, "waiting": 0}

        is_running = True

    app = create_app(FakeEngine(), ServerSettings(allowed_hosts=None, allowed_origins=("http://ok.example",)))
    client = TestClient(app)
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = client.options("/v1/chat/completions", headers={"Origin": "http://ok.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
    bad = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers


def test_local_files_never_follow_links(env):
    media, outside = env["media"], env["outside"]
    (media / "link.png").symlink_to(outside / "secret.png")
    os.symlink(outside, media / "dirlink")
    for name in ("link.png", "dirlink/secret.png", "../outside/secret.png"):
        assert_error(post(env["strict"], {"messages": image_msg((media / name).as_uri())}), 400,
                     "media_not_allowed")
    inside = post(env["strict"], {"messages": image_msg((media / "red.png").as_uri()), "max_tokens": 1})
    assert inside.status_code == 200
    still_serving(env)


def test_symlink_flipped_during_reads_never_leaks(tmp_path):
    """A link flipped between a file inside and one outside while 300 reads run: none returns the outside bytes
    (the old realpath-then-open check leaked 14 of 300)."""
    from qwen2vl.server.local_files import LocalFileError, read_local

    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    (root / "inside.png").write_bytes(b"inside")
    (out / "secret.png").write_bytes(b"secret")
    (root / "sub").mkdir()
    (root / "sub" / "f.png").write_bytes(b"inside")
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for target in (root / "inside.png", out / "secret.png"):
                tmp = root / "f.tmp"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target)
                os.replace(tmp, root / "f.png")
            for target in (root / "sub", out):  # a directory component flipping as well
                tmp = root / "d.tmp"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target)
                os.replace(tmp, root / "d")

    th = threading.Thread(target=flip, daemon=True)
    th.start()
    got = []
    try:
        for i in range(300):
            for name in ("f.png", "d/f.png", "d/secret.png"):
                try:
                    got.append(read_local((root / name).as_uri(), str(root), 1000))
                except LocalFileError:
                    pass
    finally:
        stop.set()
        th.join()
    assert b"secret" not in got
    assert read_local((root / "inside.png").as_uri(), str(root), 1000) == b"inside"
