"""Qwen2VLProcessor vs the transformers oracle processor, plus validation, routing, chat-template media, saving.

The oracle's torch image/video processors need torchvision (not installable here), so the oracle processor is
built with transformers' `Qwen2VLImageProcessorPil` and compared with our PIL backend exactly; our torch backend is
compared with exact ids/grids and a pixel tolerance. For videos the oracle runs *our* video processor (adapter):
that checks the processor logic (expansion, ordering, validation, batching) — video pixel parity itself belongs to
the video processor's tests.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.processing import AutoProcessor, MediaLimits, Qwen2VLProcessor, Qwen2VLVideoProcessor
from paths import QWEN2VL_2B

CKPT = QWEN2VL_2B
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason="Qwen2-VL-2B metadata not available")
TEMPLATE = json.loads((CKPT / "chat_template.json").read_text())["chat_template"]
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def _noise(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _smooth(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([127 + 100 * np.sin(x / 17), 127 + 100 * np.cos(y / 23), (x + y) * 255 / (h + w)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _video(frames, h, w, seed=1):
    return np.random.RandomState(seed).randint(0, 256, (frames, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ours():
    return AutoProcessor.from_pretrained(CKPT, backend="pil")


@pytest.fixture(scope="module")
def ours_torch():
    return AutoProcessor.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def oracle():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Oracle(transformers.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # accept the duck-typed video processor
            return type(arg)

    class VideoAdapter:  # our video processor, fed only the options the oracle actually set
        def __init__(self, inner):
            self.inner, self.merge_size = inner, inner.merge_size

        def __call__(self, videos, **kw):
            keep = ("fps", "num_frames", "do_sample_frames", "min_pixels", "max_pixels", "size")
            return self.inner(videos, return_tensors="pt", **{k: v for k, v in kw.items() if k in keep and v is not None})

    return Oracle(image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(CKPT)),
                  tokenizer=transformers.AutoTokenizer.from_pretrained(str(CKPT)),
                  video_processor=VideoAdapter(Qwen2VLVideoProcessor.from_pretrained(CKPT)), chat_template=TEMPLATE)


def _assert_same(a, b, pixel_atol=0.0):
    assert set(a.keys()) == set(b.keys()), (sorted(a.keys()), sorted(b.keys()))
    for key in b:
        x, y = torch.as_tensor(np.asarray(a[key])), torch.as_tensor(np.asarray(b[key]))
        assert x.shape == y.shape, key
        if key.startswith("pixel_values"):
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, y.float(), atol=pixel_atol, rtol=0)
        else:
            assert x.dtype == torch.int64 and torch.equal(x, y.long()), key


CASES = {
    "single_image": dict(text=f"{IMG}Describe.", images=[_noise(56, 84)]),
    "multi_image": dict(text=f"A {IMG} B {IMG} C", images=[_noise(56, 84), _noise(112, 112, 2)]),
    "min_pixels_call": dict(text=f"{IMG}{IMG}", images=[_noise(56, 84), _noise(30, 40, 3)], min_pixels=112 * 112),
    "max_pixels_call": dict(text=f"{IMG}x", images=[_noise(200, 300, 4)], max_pixels=56 * 56 * 4),
    "video_frames": dict(text=f"{VID}What happens?", videos=[_video(4, 56, 56)], max_pixels=56 * 56),
    "odd_frames": dict(text=f"{VID}{VID}", videos=[_video(5, 56, 84), _video(2, 28, 28, 3)], max_pixels=56 * 84),
    "mixed_batch": dict(text=[f"{IMG} then {VID} end", "plain text only, longer than the others", f"{IMG}{IMG}"],
                        images=[_noise(56, 56), _noise(84, 56, 5), _noise(56, 112, 6)], videos=[_video(4, 56, 56)],
                        padding=True, max_pixels=56 * 112),
    "text_only": dict(text=["hello", "hi there <|im_end|>"], padding=True),
    "right_pad_truncate_ok": dict(text=[f"{IMG}a b c d e", "x"], images=[_noise(56, 56)], padding="max_length",
                                  max_length=12, truncation=True, padding_side="right"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_oracle_parity_pil(ours, oracle, case):
    kwargs = dict(CASES[case])
    with _quiet():
        expected = oracle(return_tensors="pt", **kwargs)
    _assert_same(ours(return_tensors="pt", **kwargs), expected)


def test_oracle_parity_torch_backend(ours_torch, oracle):
    kwargs = dict(text=[f"{IMG}smooth", f"{IMG}{IMG}"], images=[_smooth(100, 150), _smooth(56, 56), _smooth(90, 60)],
                  padding=True, max_pixels=112 * 112)
    with _quiet():
        expected = oracle(return_tensors="pt", **kwargs)
    got = ours_torch(return_tensors="pt", **kwargs)
    # torch vs PIL bicubic differ by ≤2 uint8 levels on smooth images (REFERENCE §5.6): 2/255/0.26 ≈ 0.03
    _assert_same(got, expected, pixel_atol=0.035)
    assert (got["pixel_values"] - expected["pixel_values"]).abs().mean() < 2e-3


def test_outputs_layout(ours):
    out = ours(text=[f"{IMG}a", "b"], images=[_noise(56, 56)], videos=None, padding=True, return_tensors="pt")
    assert out["input_ids"][1, 0] == 151643 and out["attention_mask"][1, 0] == 0  # left padding by default
    assert (out["mm_token_type_ids"] == (out["input_ids"] == 151655).long()).all()
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]] and out["pixel_values"].shape == (16, 1176)
    out = ours(text=f"{VID}", videos=[_video(4, 56, 56)], max_pixels=56 * 56)
    assert isinstance(out["input_ids"], list) and len(out["input_ids"]) == 1  # str → batch of one, like the oracle
    assert set(out["mm_token_type_ids"][0]) == {0, 2}
    moved = ours(text="hi", images=None, return_tensors="pt").to("cpu")
    assert set(moved.keys()) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    only_images = ours(images=[_noise(56, 56)], return_tensors="pt")
    assert set(only_images.keys()) == {"pixel_values", "image_grid_thw"}


@pytest.mark.parametrize("kwargs,match", [
    ({}, "at least one input"),
    ({"text": f"{IMG}{IMG}", "images": [_noise(56, 56)]}, "should be the same as the number of images"),
    ({"text": f"{IMG}"}, "but no images were passed"),
    ({"text": f"{VID}", "videos": [_video(2, 28, 28), _video(2, 28, 28)]}, "number of videos"),
    ({"text": "no placeholder", "images": [_noise(56, 56)]}, "Found total 0"),
    ({"text": [1, 2]}, "must be a string or list of strings"),
    ({"text": f"{IMG}", "images": [_noise(56, 56)], "truncation": True, "max_length": 3}, "Mismatch in `image`"),
    ({"text": f"{VID}", "videos": [_video(4, 56, 56)], "truncation": True, "max_length": 2}, "Mismatch in `video`"),
])
def test_validation_matches_oracle(ours, oracle, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)
    with pytest.raises(ValueError, match=match), _quiet():
        oracle(**kwargs)


def test_own_errors(ours):
    with pytest.raises(ValueError, match="unexpected keyword"):
        ours(text="a", max_pixel=5)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(text=VID, videos=[_video(4, 28, 28)], fps=1, num_frames=2)
    with pytest.raises(ValueError, match="per-item"):
        ours(text=IMG, images=[_noise(56, 56)], per_image_kwargs=[{}, {}])
    with pytest.raises(ValueError, match="Unable to create tensor"):
        ours(text=["a b c", "a"], return_tensors="pt")


def test_chat_template_tokenize_parity(ours, oracle):
    conv = [{"role": "user", "content": [{"type": "image", "image": _noise(56, 84)}, {"type": "text", "text": "Hi"},
                                         {"type": "video", "video": _video(4, 56, 56)}]}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with _quiet():
        expected = oracle.apply_chat_template(conv, processor_kwargs={"max_pixels": 56 * 84}, **kw)
    got = ours.apply_chat_template(conv, processor_kwargs={"max_pixels": 56 * 84}, **kw)
    _assert_same(got, expected)
    assert got["input_ids"][0, :16].tolist() == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
                                                 151644, 872, 198, 151652, 151655]
    ids = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, max_pixels=56 * 84)
    assert ids == expected["input_ids"].tolist()  # default: input_ids as lists


def test_chat_template_batch_left_padded(ours, oracle):
    convs = [[{"role": "user", "content": [{"type": "image", "image": _noise(56, 56)}, {"type": "text", "text": "a"}]}],
             [{"role": "user", "content": "a much longer text-only question, so that padding is needed"}]]
    got = ours.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    with _quiet():
        expected = oracle.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt", processor_kwargs={"padding": True})
    _assert_same(got, expected)
    assert got["attention_mask"][0, 0] == 0


def test_chat_template_sources_and_per_item_options(ours, tmp_path):
    img = _noise(56, 84)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    img.save(tmp_path / "a.png")
    blocks = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
              {"type": "image", "path": str(tmp_path / "a.png")}, {"type": "image", "base64": b64},
              {"type": "image", "image": img}]
    conv = [{"role": "user", "content": blocks + [{"type": "text", "text": "same?"}]}]
    out = ours.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    ref = ours(text=IMG * 4, images=[img] * 4, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
    # per-item options: only that item changes; resized_* gives exactly that size (rounded to 28)
    conv = [{"role": "user", "content": [
        {"type": "image", "image": _noise(112, 112), "max_pixels": 56 * 56},
        {"type": "image", "image": img, "resized_height": 110, "resized_width": 140},
        {"type": "image", "image": _noise(112, 112)}, {"type": "text", "text": "x"}]}]
    out = ours.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 10], [1, 8, 8]]
    assert int((out["input_ids"] == 151655).sum()) == (16 + 80 + 64) // 4
    single = ours(text=IMG, images=[_noise(112, 112)], max_pixels=56 * 56, return_tensors="pt")
    assert torch.equal(out["pixel_values"][:16], single["pixel_values"])
    with pytest.raises(ValueError, match="given together"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": img, "resized_height": 56}]}],
                                 tokenize=True)


def test_chat_template_video_file_fps_and_limits(ours, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for frame in _video(8, 56, 56):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "?"}]}]
    out = ours.apply_chat_template(conv, tokenize=True, return_dict=True, fps=2, return_tensors="pt", max_pixels=56 * 56)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]  # 8 frames @4fps, 2 fps → 4 frames → t=2
    per_item = [{"role": "user", "content": [{"type": "video", "video": str(path), "nframes": 2,
                                              "resized_height": 28, "resized_width": 56}]}]
    out = ours.apply_chat_template(per_item, tokenize=True, return_dict=True, return_tensors="pt")
    # qwen-vl-utils bounds the requested size by its MIN_PIXELS=4*28*28: 28x56 → 56x84
    assert out["video_grid_thw"].tolist() == [[1, 4, 6]]
    data_uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    frames = [Image.fromarray(f) for f in _video(4, 56, 56)]
    for name, frame in enumerate(frames):
        frame.save(tmp_path / f"f{name}.png")
    mixed = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_uri}}, {"type": "video", "video": frames},
        {"type": "video", "video": [str(tmp_path / f"f{i}.png") for i in range(4)]}, {"type": "text", "text": "?"}]}]
    out = ours.apply_chat_template(mixed, tokenize=True, return_dict=True, num_frames=4, return_tensors="pt",
                                   max_pixels=56 * 56)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]] * 3
    n = 2 * 4 * 4
    assert torch.equal(out["pixel_values_videos"][n:2 * n], out["pixel_values_videos"][2 * n:])  # PIL == paths
    with pytest.raises(ValueError):
        ours.apply_chat_template(conv, tokenize=True, media_limits=MediaLimits(allow_local_files=False))
    with pytest.raises(ValueError):
        ours.apply_chat_template(per_item, tokenize=True, media_limits=MediaLimits(allow_local_files=False))


def test_chat_template_video_path_decodes_only_sampled_frames(ours, tmp_path, monkeypatch):
    """A video named by path in a chat message reaches the video processor undecoded: sampling indices come from
    the stream metadata, and only the sampled frames are converted and kept (not all 30 frames first)."""
    av = pytest.importorskip("av")
    from qwen2vl.processing import video_loading as media  # the frames are decoded there

    path = tmp_path / "long.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for frame in _video(30, 56, 56):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decodes = []
    real = media._decode_selected

    def counting(av_mod, src, indices, width, height, *frame_fn):
        kept, count = real(av_mod, src, indices, width, height, *frame_fn)
        decodes.append(sorted(kept))
        return kept, count

    monkeypatch.setattr(media, "_decode_selected", counting)
    sampled = [0, 7, 15, 22]  # 30 frames @10 fps at 1 fps = 3, raised to min_frames=4
    convs = {
        "block fps": [{"type": "video", "video": str(path), "fps": 1}],
        "block nframes": [{"type": "video", "video": str(path), "nframes": 4}],
        "resized": [{"type": "video", "video": str(path), "fps": 1, "resized_height": 56, "resized_width": 56}],
    }
    for name, blocks in convs.items():
        decodes.clear()
        conv = [{"role": "user", "content": blocks + [{"type": "text", "text": "?"}]}]
        out = ours.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt",
                                       max_pixels=56 * 56)
        assert decodes == [sampled], name  # one decoding pass that kept exactly the sampled frames
        assert out["video_grid_thw"].tolist() == [[2, 4, 4]], name
    decodes.clear()  # a call-level fps works the same way
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "?"}]}]
    ours.apply_chat_template(conv, tokenize=True, return_dict=True, fps=1, max_pixels=56 * 56)
    assert decodes == [sampled]


def test_from_pretrained_overrides_save_and_reload(ours, tmp_path, monkeypatch):
    p = AutoProcessor.from_pretrained(CKPT, min_pixels=28 * 28 * 4, max_pixels=56 * 56, padding_side="right")
    assert isinstance(p, Qwen2VLProcessor) and p.tokenizer.padding_side == "right"
    assert (p.image_processor.min_pixels, p.image_processor.max_pixels) == (28 * 28 * 4, 56 * 56)
    assert p.video_processor.max_pixels == 56 * 56
    assert p(text=IMG, images=[_noise(200, 200)])["image_grid_thw"].tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match="unknown option"):
        AutoProcessor.from_pretrained(CKPT, max_pixel=5)
    files = {Path(f).name for f in p.save_pretrained(tmp_path)}
    assert {"preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    again = AutoProcessor.from_pretrained(tmp_path)
    batch = dict(text=[f"{IMG}x", "yy"], images=[_noise(200, 150)], padding=True, return_tensors="pt")
    _assert_same(again(**batch), p(**batch))
    assert again.chat_template == TEMPLATE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"'nobody/nothing-here'.*HF_HUB_OFFLINE"):
        AutoProcessor.from_pretrained("nobody/nothing-here")


def test_decode_helpers_and_token_counts(ours, oracle):
    ids = torch.tensor([[151644, 872, 198, 9707, 151645], [151643, 151643, 9707, 11, 1879]])
    assert ours.batch_decode(ids, skip_special_tokens=True) == oracle.batch_decode(ids, skip_special_tokens=True)
    assert ours.post_process_image_text_to_text(ids) == oracle.post_process_image_text_to_text(ids)
    assert ours.decode(ids[0]) == oracle.decode(ids[0])
    sizes = [(100, 100), (300, 100), (500, 30)]
    counts = ours.get_num_multimodal_tokens(image_sizes=sizes)
    assert counts["num_image_tokens"] == [16, 44, 18] and counts["num_image_patches"] == [64, 176, 72]
    ref = oracle._get_num_multimodal_tokens(image_sizes=sizes)
    assert counts["num_image_tokens"] == list(ref.num_image_tokens)
    small = ours._get_num_multimodal_tokens(image_sizes=[(200, 300)], video_sizes=[(5, 56, 56)], max_pixels=56 * 56)
    assert small == {"num_image_tokens": [2], "num_image_patches": [8], "num_video_tokens": [12]}


class _quiet:
    """Silence the oracle's deprecation warnings for call-time min/max_pixels."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
