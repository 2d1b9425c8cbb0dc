"""media.load_image / load_video: every source kind, EXIF, transparency, limits, and clear errors.

HTTP is tested against a local http.server on 127.0.0.1 started by the fixture (no external network).
"""
import base64
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.processing.media import MediaLimits, load_image, load_video


def png_bytes(w=40, h=30, mode="RGB"):
    arr = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=20000, height=20000):
    """A tiny PNG whose header claims a huge size (patched IHDR with a valid CRC)."""
    data = bytearray(png_bytes(1, 1))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def video_bytes(n=8, fps=4):
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- images
def test_image_sources_agree(tmp_path):
    raw = png_bytes()
    path = tmp_path / "a b.png"  # a space checks file:// percent-decoding
    path.write_bytes(raw)
    b64 = base64.b64encode(raw).decode()
    ref = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    sources = [str(path), path, path.as_uri(), raw, bytearray(raw), "data:image/png;base64," + b64, b64,
               b64[:40] + "\n" + b64[40:], Image.open(io.BytesIO(raw)), ref, ref.transpose(2, 0, 1),
               torch.from_numpy(ref.copy()), ref.astype(np.float32) / 255]
    for src in sources:
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(img), ref)


def test_exif_and_transparency(tmp_path):
    img = Image.fromarray(np.zeros((20, 50, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(str(path)).size == (20, 50)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red, bottom fully transparent -> white
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 3].tolist() == [255, 255, 255]
    gray = load_image(Image.fromarray(np.full((3, 3), 7, np.uint8)))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [7, 7, 7]


def test_image_errors(tmp_path):
    with pytest.raises(ValueError, match="not an existing file.*valid base64"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="not an existing file"):
        load_image("this is not base64!")
    with pytest.raises(ValueError, match="not a recognised image format"):
        load_image(b"definitely not an image" * 10)
    with pytest.raises(ValueError, match="not a recognised image format.*not an existing file either"):
        load_image(base64.b64encode(b"\x00\x01garbage" * 30).decode())
    with pytest.raises(ValueError, match="not an existing file either"):
        load_image("imgs/cat")  # a missing path that happens to be valid base64
    truncated = png_bytes(200, 200)[:300]
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(truncated)
    long_b64 = "QUFB" * 5000  # valid base64 of "AAA..." -> not an image; the message must stay short
    with pytest.raises(ValueError, match=r"\(20000 chars\)") as err:
        load_image(long_b64)
    assert len(str(err.value)) < 300
    with pytest.raises(ValueError, match="zero size"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="media type 'video/mp4'"):
        load_image("data:video/mp4;base64,AAAA")
    with pytest.raises(ValueError, match="empty"):
        load_image(b"")


def test_decompression_bomb_checked_before_decoding():
    with pytest.raises(ValueError, match="9000x9000 .* over the 64000000-pixel limit"):
        load_image(bomb_png(9000, 9000))
    # beyond PIL's own guard (2 * MAX_IMAGE_PIXELS) its DecompressionBombError also becomes a ValueError
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(bomb_png(20000, 20000), max_image_pixels=10**12)
    with pytest.raises(ValueError, match="over the 100-pixel limit"):
        load_image(png_bytes(20, 20), max_image_pixels=100)


def test_disabled_sources(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes())
    strict = MediaLimits(allow_local_files=False, allow_remote=False)
    with pytest.raises(ValueError, match="local files is not allowed"):
        load_image(path, limits=strict)
    with pytest.raises(ValueError, match="local files is not allowed"):
        load_image(path.as_uri(), limits=strict)
    with pytest.raises(ValueError, match="local files is not allowed"):
        load_image(str(path), limits=strict)
    with pytest.raises(ValueError, match="remote URLs is not allowed"):
        load_image("http://127.0.0.1:9/x.png", limits=strict)
    with pytest.raises(ValueError, match="local files is not allowed"):
        load_video(str(path), allow_local_files=False)
    assert load_image(png_bytes(), limits=strict).size == (40, 30)  # inline data stays allowed


# ---------------------------------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    routes: dict = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        kind, payload = self.routes.get(self.path, ("status", 404))
        if kind == "status":
            self.send_response(payload)
            self.end_headers()
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", payload)
            self.end_headers()
        elif kind == "slow":
            time.sleep(payload)
            self.send_response(200)
            self.end_headers()
        else:  # body; "stream" omits Content-Length so the cap must be enforced while streaming
            self.send_response(200)
            if kind == "body":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)


@pytest.fixture(scope="module")
def server():
    raw, vid = png_bytes(), video_bytes()
    _Handler.routes = {
        "/img.png": ("body", raw), "/redirect": ("redirect", "/img.png"), "/loop": ("redirect", "/loop"),
        "/big": ("body", raw + b"\0" * 5000), "/stream": ("stream", raw + b"\0" * 5000),
        "/slow": ("slow", 1.5), "/v.mp4": ("body", vid),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_images(server):
    assert load_image(server + "/img.png").size == (40, 30)
    assert load_image(server + "/redirect").size == (40, 30)
    with pytest.raises(ValueError, match="more than 5 redirects"):
        load_image(server + "/loop")
    with pytest.raises(ValueError, match="HTTP 404"):
        load_image(server + "/nothing")
    n = len(png_bytes())
    with pytest.raises(ValueError, match="over the .*-byte limit"):
        load_image(server + "/big", max_bytes=n + 100)
    with pytest.raises(ValueError, match="exceeds the .*-byte limit"):
        load_image(server + "/stream", max_bytes=n + 100)
    with pytest.raises(ValueError, match="timed out"):
        load_image(server + "/slow", timeout=0.3)


def test_http_video(server):
    frames, meta = load_video(server + "/v.mp4")
    assert frames.shape == (8, 32, 32, 3) and meta.total_num_frames == 8 and meta.fps == 4.0


# ---------------------------------------------------------------------------------------------- videos
def test_video_sources_and_errors(tmp_path):
    raw = video_bytes()
    path = tmp_path / "clip.mp4"
    path.write_bytes(raw)
    uri = "data:video/mp4;base64," + base64.b64encode(raw).decode()
    for src in (str(path), path, path.as_uri(), raw, uri):
        frames, meta = load_video(src, sample_indices_fn=lambda m: [0, 4, 7])
        assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
        assert (meta.total_num_frames, meta.fps, meta.width, meta.height) == (8, 4.0, 32, 32)
        assert meta.frames_indices == [0, 4, 7] and meta.duration == 2.0
        assert abs(meta.sampled_fps - 1.5) < 1e-9 and meta.timestamps == [0.0, 1.0, 1.75]
    with pytest.raises(ValueError, match="file not found"):
        load_video(str(tmp_path / "nope.mp4"))
    with pytest.raises(ValueError, match="cannot decode video"):
        load_video(b"not a video at all" * 100)
    with pytest.raises(ValueError, match="cannot decode video|no video stream"):
        load_video(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="over the limit of 4"):
        load_video(raw, limits=MediaLimits(max_video_frames=4))
    with pytest.raises(ValueError, match=r"clip.mp4.*must lie in \[0, 8\)"):
        load_video(path, sample_indices_fn=lambda m: [0, 8])
    with pytest.raises(ValueError, match="clip.mp4.*exceeds"):
        from qwen2vl.processing.video_processing import sample_frame_indices
        load_video(path, sample_indices_fn=lambda m: sample_frame_indices(m.total_num_frames, m.fps, num_frames=10))
    with pytest.raises(ValueError, match="more than the 100-byte limit"):
        load_video(uri, max_bytes=100)
    with pytest.raises(ValueError, match="unsupported video source"):
        load_video(12)
