"""Video processor: frame sampling goldens, layout, input forms, pixel budgets, config loading, PyAV decoding.

The oracle `transformers.Qwen2VLVideoProcessor` needs torchvision, which needs another torch than the suite's: it
runs in a separate venv in tests/test_video_oracle.py. Here frames are checked against
(a) our torch image processor applied per frame (same resize kernel: exact) and (b) the oracle PIL *image*
processor per frame with the cross-backend tolerance (max |diff| <= 0.05, mean <= 1e-3 normalized units).
"""
import json
import os
import tracemalloc
import warnings

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.processing.image_processing import Qwen2VLImageProcessor, smart_resize
from qwen2vl.processing.media import VideoMetadata, load_video
from qwen2vl.processing.video_processing import Qwen2VLVideoProcessor, sample_frame_indices
from paths import QWEN2VL_2B

CKPT = str(QWEN2VL_2B)


def frames_array(n, h, w, seed=0):
    """(F,H,W,3) uint8 smooth frames that differ per frame."""
    y, x = np.mgrid[0:h, 0:w]
    out = [np.stack([127 + 120 * np.sin(x / 13 + c + f * 0.3) * np.cos(y / 11 - c) for c in range(3)], -1)
           for f in range(n)]
    return np.stack(out).clip(0, 255).astype(np.uint8)


def write_video(path, n=30, w=64, h=48, fps=10, codec="mpeg4"):
    """Frame i is a flat grey of level 8*i, so decoded frames reveal their index."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (8 * i) % 256, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def frame_index(frame):
    return int(round(float(frame.mean()) / 8))


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_goldens():
    assert sample_frame_indices(300, 30, fps=2) == list(range(0, 300, 15))
    assert len(sample_frame_indices(300, 30, fps=1)) == 10
    assert sample_frame_indices(300, 30, num_frames=9) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert sample_frame_indices(300, 30, fps=0.1) == [0, 75, 150, 225]  # clamped to min_frames=4
    assert len(sample_frame_indices(300, 30, num_frames=5)) == 4  # round(2.5) == 2 -> 4 frames
    assert sample_frame_indices(300, 30, fps=2, max_frames=6) == [0, 50, 100, 150, 200, 250]
    assert sample_frame_indices(7, None) == list(range(7))  # neither fps nor num_frames: all frames
    with pytest.raises(ValueError, match="mutually exclusive"):
        sample_frame_indices(300, 30, fps=2, num_frames=8)
    with pytest.raises(ValueError, match="frame rate is unknown"):
        sample_frame_indices(300, None, fps=2)
    with pytest.raises(ValueError, match="exceeds"):
        sample_frame_indices(10, 30, num_frames=12)
    with pytest.raises(ValueError, match="selects 0 frames"):
        sample_frame_indices(10, 30, num_frames=1)


# ---------------------------------------------------------------------------------------------- layout / parity
def test_five_frames_grid_padding_and_per_frame_parity():
    """5 frames 100x120 -> grid [[3,22,26]]; last temporal patch = frame 5 duplicated; each frame equals the torch
    image processor on that frame (exact) and the oracle PIL image processor within cross-backend tolerance."""
    video = frames_array(5, 100, 120)
    out = Qwen2VLVideoProcessor()(video)
    assert out["video_grid_thw"].tolist() == [[3, 22, 26]]
    pv = out["pixel_values_videos"].reshape(3, 22 * 26, 3, 2, 14, 14)
    assert torch.equal(pv[2, :, :, 0], pv[2, :, :, 1])  # padded by repeating the last frame
    size = dict(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    assert smart_resize(100, 120, 28, **size) == (308, 364)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import Qwen2VLImageProcessorPil as HFPil
    oracle = HFPil(**size)
    for f in range(5):
        img = Qwen2VLImageProcessor(**size)(video[f])["pixel_values"].reshape(-1, 3, 2, 14, 14)[:, :, 0]
        assert torch.equal(pv[f // 2, :, :, f % 2], img)
        ref = torch.from_numpy(oracle(video[f], return_tensors="np")["pixel_values"]).reshape(-1, 3, 2, 14, 14)
        diff = (pv[f // 2, :, :, f % 2] - ref[:, :, 0]).abs()
        assert diff.max() <= 0.05 and diff.mean() <= 1e-3


def test_input_forms_agree(tmp_path):
    video = frames_array(4, 56, 84)
    proc = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 84)
    ref = proc(video)["pixel_values_videos"]
    paths = []
    for i, f in enumerate(video):
        paths.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(f).save(paths[-1])
    forms = [torch.from_numpy(video).permute(0, 3, 1, 2), [Image.fromarray(f) for f in video], list(video), paths,
             [paths], (video, VideoMetadata(total_num_frames=4, frames_indices=[0, 1, 2, 3]))]
    for form in forms:
        assert torch.equal(proc(form)["pixel_values_videos"], ref)
    two = proc([video, frames_array(2, 100, 60)], return_tensors="np")
    h, w = smart_resize(100, 60, 28, 56 * 56, 56 * 84)
    assert two["video_grid_thw"].tolist() == [[2, 4, 6], [1, h // 14, w // 14]]
    assert two["pixel_values_videos"].shape == (48 + h * w // 196, 1176)
    np.testing.assert_array_equal(two["pixel_values_videos"][:48], ref.numpy())


def test_pixel_budgets():
    video = frames_array(8, 200, 300)
    proc = Qwen2VLVideoProcessor()
    grid = proc(video, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)["video_grid_thw"].tolist()
    h, w = smart_resize(200, 300, 28, 28 * 28 * 4, 28 * 28 * 16)
    assert grid == [[4, h // 14, w // 14]]
    total = 28 * 28 * 40
    cap = max(min(768 * 28 * 28, total / 8 * 2), int(1.05 * 128 * 28 * 28))
    h, w = smart_resize(200, 300, 28, 128 * 28 * 28, cap)
    assert proc(video, total_pixels=total)["video_grid_thw"].tolist() == [[4, h // 14, w // 14]]
    assert proc.get_num_of_video_patches(5, 100, 120) == 3 * 22 * 26


def test_sampling_on_arrays_needs_metadata_for_fps():
    video = frames_array(20, 28, 28)
    proc = Qwen2VLVideoProcessor()
    with pytest.raises(ValueError, match="frame rate is unknown"):
        proc(video, fps=1)
    out = proc(video, fps=1, video_metadata={"fps": 5, "total_num_frames": 20}, return_metadata=True)
    assert out["video_metadata"][0].frames_indices == [0, 5, 10, 15]
    assert out["video_grid_thw"].tolist()[0][0] == 2
    assert proc(video, num_frames=6)["video_grid_thw"].tolist()[0][0] == 3
    assert proc(video, do_sample_frames=True)["video_grid_thw"].tolist()[0][0] == 10  # all frames
    with pytest.raises(ValueError, match="do_sample_frames=False"):
        proc(video, num_frames=6, do_sample_frames=False)
    with pytest.raises(ValueError, match="mutually exclusive"):
        proc(video, num_frames=6, fps=1)
    with pytest.raises(ValueError, match="2 videos but 1"):
        proc([video, video], video_metadata=[{"fps": 5}])


# ---------------------------------------------------------------------------------------------- files
def test_video_file_sampling(tmp_path):
    path = write_video(tmp_path / "v.mp4", n=30, fps=10)
    proc = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    out = proc(path, fps=2, return_metadata=True)
    meta = out["video_metadata"][0]
    assert (meta.total_num_frames, meta.fps, meta.frames_indices) == (30, 10.0, [0, 5, 10, 15, 20, 25])
    assert out["video_grid_thw"].tolist()[0][0] == 3
    assert proc(path, num_frames=4, return_metadata=True)["video_metadata"][0].frames_indices == [0, 7, 15, 22]
    assert proc(path)["video_grid_thw"].tolist()[0][0] == 15  # no sampling by default (reference BC)
    # decoded frames are the requested ones (frame i has grey level 8*i)
    frames, md = load_video(path, sample_indices_fn=lambda m: [3, 17, 29])
    assert [frame_index(f) for f in frames] == [3, 17, 29] and md.frames_indices == [3, 17, 29]
    # a container without a stored frame count (Matroska) falls back to a counting pass
    mkv = write_video(tmp_path / "v.mkv", n=12, fps=6)
    frames, md = load_video(mkv, sample_indices_fn=lambda m: sample_frame_indices(m.total_num_frames, m.fps, fps=2))
    assert md.total_num_frames == 12 and md.frames_indices == [0, 3, 6, 9]
    assert [frame_index(f) for f in frames] == [0, 3, 6, 9]


def test_decoding_keeps_only_sampled_frames(tmp_path):
    """120 frames of 320x240 RGB are ~27 MB decoded; sampling 4 must keep peak Python memory far below that."""
    path = write_video(tmp_path / "long.mp4", n=120, w=320, h=240, fps=30)
    tracemalloc.start()
    try:
        frames, md = load_video(path, sample_indices_fn=lambda m: sample_frame_indices(m.total_num_frames, m.fps,
                                                                                       num_frames=4))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames.shape == (4, 240, 320, 3) and md.frames_indices == [0, 30, 60, 90]
    assert peak < 5 * 1024**2


def test_from_pretrained_fallback_and_roundtrip(tmp_path):
    proc = Qwen2VLVideoProcessor.from_pretrained(CKPT)  # no video config: inherits the image min/max pixels
    assert (proc.min_pixels, proc.max_pixels) == (3136, 12845056)
    assert Qwen2VLVideoProcessor().size == {"shortest_edge": 100352, "longest_edge": 602112}
    proc = Qwen2VLVideoProcessor(fps=2.0, do_sample_frames=True, max_pixels=28 * 28 * 200)
    proc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert cfg["video_processor_type"] == "Qwen2VLVideoProcessor" and cfg["fps"] == 2.0
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 1, "max_pixels": 2}))
    again = Qwen2VLVideoProcessor.from_pretrained(tmp_path)  # the video config wins
    assert again.to_dict() == proc.to_dict()
    out = again(frames_array(20, 28, 28), video_metadata={"fps": 10}, return_metadata=True)
    assert out["video_metadata"][0].frames_indices == [0, 5, 10, 15]  # config-level fps sampling
    assert os.path.isfile(tmp_path / "video_preprocessor_config.json")
