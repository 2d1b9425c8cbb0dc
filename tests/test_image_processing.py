"""Image processors: smart_resize goldens, layout, options, (de)serialisation, parity with transformers 5.24.

Oracle = `transformers.Qwen2VLImageProcessorPil` (its torch processor needs torchvision, which is not installed,
so our torch backend is compared against the oracle PIL processor with the reference's cross-backend tolerance).
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.processing.image_processing import (
    Qwen2VLImageProcessor,
    patchify,
    smart_resize,
    torch_resize,
)
from qwen2vl.processing.image_processing_pil import Qwen2VLImageProcessorPil
from qwen2vl.processing.patchify import channel_lut, lut_patchify, torch_rescale_normalize

CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen2-vl", "Qwen2-VL-2B-Instruct")
CKPT = CKPT if os.path.isdir(CKPT) else "/work/shared/qwen2-vl/Qwen2-VL-2B-Instruct"


def smooth(h, w, seed=0):
    """Smooth colour image (the reference measured torch-vs-PIL kernel differences on such content)."""
    y, x = np.mgrid[0:h, 0:w]
    chans = [127 + 120 * np.sin(x / (17 + seed) + c) * np.cos(y / 23 - c) for c in range(3)]
    return np.stack(chans, -1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def oracle():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import Qwen2VLImageProcessorPil as HFPil
    return HFPil


# ---------------------------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize("hw, max_pixels, expected", [
    ((561, 278), None, (560, 280)),
    ((375, 500), None, (364, 504)),
    ((1024, 1024), None, (980, 980)),
    ((1024, 1024), 12845056, (1036, 1036)),
    ((70, 70), None, (56, 56)),  # banker's rounding: round(2.5) == 2
    ((1, 1), None, (56, 56)),
    ((4000, 3000), None, (1148, 840)),
    ((28, 5000), None, (28, 5012)),
])
def test_smart_resize_golden(hw, max_pixels, expected):
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    assert smart_resize(*hw, factor=28, min_pixels=56 * 56, **kwargs) == expected


def test_smart_resize_aspect_ratio_error():
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200, got 250"):
        smart_resize(10, 2500)


def test_grids_default_class_and_checkpoint():
    img = Image.fromarray(smooth(1024, 1024))
    assert Qwen2VLImageProcessor()(img)["image_grid_thw"].tolist() == [[1, 70, 70]]
    proc = Qwen2VLImageProcessor.from_pretrained(CKPT)
    assert (proc.min_pixels, proc.max_pixels) == (3136, 12845056)
    out = proc(img, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 74, 74]]
    assert out["pixel_values"].shape == (5476, 1176) and out["pixel_values"].dtype == torch.float32
    assert out["image_grid_thw"].dtype == torch.int64


def test_number_of_image_patches():
    proc = Qwen2VLImageProcessorPil()
    sizes = [(100, 100), (300, 100), (500, 30)]
    assert [proc.get_number_of_image_patches(h, w) for h, w in sizes] == [64, 176, 72]
    assert proc.get_number_of_image_patches(1024, 1024, {"max_pixels": 12845056}) == 5476


# ---------------------------------------------------------------------------------------------- layout
def test_patch_layout_rows_and_columns():
    """Rows are merge-block-major (t, bh, bw, ih, iw); columns (C, T, y, x); T copies are identical."""
    img = smooth(56, 84)  # already a multiple of 28: resize is the identity
    out = Qwen2VLImageProcessorPil()(img, return_tensors="np")
    pv = out["pixel_values"]
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]
    norm = ((img.transpose(2, 0, 1).astype(np.float64) / 255).astype(np.float32) - mean) / std
    gh, gw = 4, 6
    for r in range(gh * gw):
        bh, rest = divmod(r, (gw // 2) * 4)
        bw, rest = divmod(rest, 4)
        ih, iw = divmod(rest, 2)
        ph, pw = bh * 2 + ih, bw * 2 + iw
        patch = norm[:, ph * 14:(ph + 1) * 14, pw * 14:(pw + 1) * 14]  # (C, y, x)
        row = pv[r].reshape(3, 2, 14, 14)
        np.testing.assert_allclose(row[:, 0], patch, atol=1e-6)
        np.testing.assert_array_equal(row[:, 0], row[:, 1])
    # rows 0, 1, 2 = patches at pixel offsets (0,0), (0,14), (14,0)
    np.testing.assert_allclose(pv[2].reshape(3, 2, 14, 14)[:, 0], norm[:, 14:28, 0:14], atol=1e-6)


def test_patchify_numpy_and_device_paths_agree():
    """The numpy path (CPU) and the torch path (used for GPU tensors) give identical layouts, incl. padding."""
    for frames in (torch.randn(1, 3, 56, 84), torch.randn(5, 3, 28, 56), torch.randn(4, 1, 28, 28)):
        ref, grid = patchify(frames, 14, 2, 2)
        assert torch.equal(patchify(frames, 14, 2, 2, via_numpy=False)[0], ref)
        np.testing.assert_array_equal(patchify(frames.numpy(), 14, 2, 2)[0], ref.numpy())
        assert grid == ((frames.shape[0] + 1) // 2, frames.shape[2] // 14, frames.shape[3] // 14)


@pytest.mark.parametrize("f, c, h, w, p, m, t", [
    (1, 3, 56, 84, 14, 2, 2), (5, 3, 56, 84, 14, 2, 2), (4, 3, 28, 56, 14, 2, 2), (5, 3, 28, 56, 14, 2, 3),
    (7, 3, 42, 63, 7, 3, 3), (5, 1, 30, 45, 5, 3, 4), (3, 4, 28, 28, 7, 2, 1), (1, 3, 1092, 1932, 14, 2, 2)])
def test_lut_patchify_matches_float_patchify(f, c, h, w, p, m, t):
    """The uint8 table path == patchify(table[c][pixels]) for images, padded videos, odd patch sizes, 1/4 channels."""
    rng = np.random.RandomState(f * 100 + c)
    x = rng.randint(0, 256, (f, c, h, w), dtype=np.uint8)
    lut = rng.rand(c, 256).astype(np.float32)
    ref, grid = patchify(lut[np.arange(c)[None, :, None, None], x], p, m, t)
    got, got_grid = lut_patchify(x, lut, p, m, t)
    assert got_grid == grid and got.dtype == np.float32 and np.array_equal(got, ref)
    out = np.full((ref.shape[0] + 2, ref.shape[1]), np.nan, np.float32)
    assert lut_patchify(x, lut, p, m, t, out=out[1:-1])[0].base is not None
    assert np.array_equal(out[1:-1], ref) and np.isnan(out[[0, -1]]).all()  # writes exactly its slice


def test_table_path_is_bit_identical_to_float_arithmetic():
    """The torch backend's uint8 table path == torch_rescale_normalize + patchify on every pixel (bit for bit)."""
    img = np.random.RandomState(3).randint(0, 256, (97, 131, 3), dtype=np.uint8)
    for kw in ({}, {"do_normalize": False}, {"do_rescale": False}, {"image_mean": [0.5] * 3, "image_std": [0.2] * 3}):
        proc = Qwen2VLImageProcessor(**kw)
        out = proc(img)["pixel_values"]
        x = torch_resize(torch.from_numpy(img).permute(2, 0, 1).contiguous()[None], 84, 140)
        ref = patchify(torch_rescale_normalize(x, proc.do_rescale, proc.rescale_factor, proc.do_normalize,
                                               proc.image_mean, proc.image_std), 14, 2, 2)[0]
        assert torch.equal(out, ref), kw
    lut = channel_lut(lambda r: torch_rescale_normalize(r, True, 1 / 255, True, [0.5] * 3, [0.5] * 3), 3, True)
    assert lut.shape == (3, 256) and lut[0, 0] == -1 and lut[2, 255] == 1


# ---------------------------------------------------------------------------------------------- PIL parity
def _inputs():
    rgba = np.dstack([smooth(60, 80), np.tile(np.linspace(0, 255, 80).astype(np.uint8), (60, 1))])
    p_img = Image.fromarray(smooth(50, 70)).convert("P")
    p_img.info["transparency"] = 3
    return {
        "downscale": Image.fromarray(smooth(600, 400)),
        "upscale": Image.fromarray(smooth(30, 40)),
        "odd": Image.fromarray(smooth(97, 131)),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rgba, "RGBA").convert("LA"),
        "L": Image.fromarray(smooth(64, 48)).convert("L"),
        "P": p_img,
        "CMYK": Image.fromarray(smooth(40, 90)).convert("CMYK"),
        "I;16": Image.fromarray(smooth(45, 45)[..., 0].astype(np.uint16) * 3),
        "np_hwc": smooth(77, 55),
        "np_chw": smooth(55, 77).transpose(2, 0, 1).copy(),
        "np_rgba": rgba,
        "torch_chw": torch.from_numpy(smooth(66, 99).transpose(2, 0, 1).copy()),
        "torch_hwc": torch.from_numpy(smooth(66, 99)),
    }


@pytest.mark.parametrize("name", list(_inputs()))
def test_pil_backend_matches_oracle(oracle, name):
    """PIL backend vs oracle PIL processor: identical grids, max |diff| <= 1e-5 (measured: exactly 0)."""
    image = _inputs()[name]
    ours = Qwen2VLImageProcessorPil()(image, return_tensors="np")
    ref = oracle()(image, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


def test_pil_backend_exactly_equals_oracle_on_noise(oracle):
    """Random noise (worst case for any arithmetic shortcut), up- and downscaled, one batch: bit-identical."""
    rng = np.random.RandomState(7)
    imgs = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((480, 640), (61, 47))]
    ours = Qwen2VLImageProcessorPil(max_pixels=12845056)(imgs, return_tensors="np")
    ref = oracle(max_pixels=12845056)(imgs, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])


def test_pil_backend_batch_options_and_float_input(oracle):
    """Several images of different sizes in one call, per-call pixel budgets, float input without rescale."""
    imgs = [Image.fromarray(smooth(200, 300)), smooth(90, 45), Image.fromarray(smooth(1000, 700, seed=3))]
    cases = [({}, {}), ({"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28},
                        {"size": {"shortest_edge": 256 * 28 * 28, "longest_edge": 512 * 28 * 28}})]
    for ours_kw, ref_kw in cases:
        ours = Qwen2VLImageProcessorPil()([imgs], return_tensors="np", **ours_kw)  # nested list is flattened
        ref = oracle()(imgs, return_tensors="np", **ref_kw)
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
        assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5
    flt = smooth(50, 70).astype(np.float32) / 255
    ours = Qwen2VLImageProcessorPil()(flt, do_rescale=False, return_tensors="np")["pixel_values"]
    ref = oracle()(flt, do_rescale=False, return_tensors="np")["pixel_values"]
    assert np.abs(ours - ref).max() <= 1e-5
    init = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)(imgs, return_tensors="np")
    ref = oracle(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)(imgs, return_tensors="np")
    np.testing.assert_array_equal(init["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(init["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


# ---------------------------------------------------------------------------------------------- torch backend
def test_torch_backend_close_to_oracle_pil(oracle):
    """Torch backend vs oracle PIL processor (cross-backend, as REFERENCE §5.6): identical grids; on smooth
    images max |diff| <= 0.05 normalized units (~2 uint8 levels) and mean |diff| <= 1e-3. Measured: max ~0.03,
    mean ~3e-5."""
    imgs = [Image.fromarray(smooth(97, 131)), Image.fromarray(smooth(600, 400)), Image.fromarray(smooth(30, 40)),
            smooth(300, 500, seed=5), torch.from_numpy(smooth(120, 80).transpose(2, 0, 1).copy())]
    ours = Qwen2VLImageProcessor()(imgs)
    ref = oracle()(imgs, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    diff = (ours["pixel_values"] - ref["pixel_values"]).abs()
    assert diff.max() <= 0.05 and diff.mean() <= 1e-3
    # inputs that only differ in container type give identical results
    a = Qwen2VLImageProcessor()(imgs[3])["pixel_values"]
    b = Qwen2VLImageProcessor()(torch.from_numpy(imgs[3]))["pixel_values"]
    c = Qwen2VLImageProcessor()(Image.fromarray(imgs[3]))["pixel_values"]
    assert torch.equal(a, b) and torch.equal(a, c)


def test_torch_resize_paths():
    """uint8 CPU uses the native kernel; the float path (used off-CPU) agrees within 1 uint8 level on smooth data,
    and same-size resizes are the identity."""
    x = torch.from_numpy(smooth(97, 131).transpose(2, 0, 1).copy())[None]
    native = torch_resize(x, 56, 84)
    flt = torch_resize(x.float(), 56, 84).clamp(0, 255).round().to(torch.uint8)
    assert native.dtype == torch.uint8 and (native.int() - flt.int()).abs().max() <= 1
    assert torch.equal(torch_resize(x, 97, 131), x)


def test_return_tensor_types():
    img = smooth(60, 60)
    assert isinstance(Qwen2VLImageProcessor()(img)["pixel_values"], torch.Tensor)
    assert isinstance(Qwen2VLImageProcessor()(img, return_tensors="np")["pixel_values"], np.ndarray)
    assert isinstance(Qwen2VLImageProcessorPil()(img)["pixel_values"], np.ndarray)
    assert isinstance(Qwen2VLImageProcessorPil()(img, return_tensors="pt")["image_grid_thw"], torch.Tensor)


# ---------------------------------------------------------------------------------------------- config
def test_size_handling():
    p = Qwen2VLImageProcessor(size={"min_pixels": 1000, "max_pixels": 5000})  # legacy hub layout
    assert p.size == {"shortest_edge": 1000, "longest_edge": 5000}
    p.max_pixels = 9000
    p.min_pixels = 2000
    assert p.size == {"shortest_edge": 2000, "longest_edge": 9000} and (p.min_pixels, p.max_pixels) == (2000, 9000)
    with pytest.raises(ValueError, match="must not exceed"):
        p.min_pixels = 10000
    assert Qwen2VLImageProcessor(min_pixels=10, size={"shortest_edge": 5, "longest_edge": 50}).min_pixels == 10
    img = smooth(1000, 1000)
    assert Qwen2VLImageProcessor()(img, size={"longest_edge": 56 * 56})["image_grid_thw"].tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match="must not exceed"):
        Qwen2VLImageProcessor(min_pixels=5000, max_pixels=100)
    with pytest.raises(ValueError, match="unexpected keyword"):
        Qwen2VLImageProcessor()(img, max_pixel=100)
    with pytest.raises(ValueError, match="unknown option"):
        Qwen2VLImageProcessor(patchsize=3)


def test_save_load_roundtrip_and_oracle_reads_it(tmp_path, oracle):
    proc = Qwen2VLImageProcessorPil.from_pretrained(CKPT, max_pixels=28 * 28 * 64)
    assert proc.max_pixels == 28 * 28 * 64 and proc.min_pixels == 3136
    proc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "Qwen2VLImageProcessor" and cfg["max_pixels"] == 28 * 28 * 64
    again = Qwen2VLImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = oracle.from_pretrained(str(tmp_path))
    img = smooth(500, 300)
    ours = proc(img, return_tensors="np")
    theirs = ref(img, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() <= 1e-5
    assert Qwen2VLImageProcessor.from_dict(proc.to_dict()).to_dict() == proc.to_dict()


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="nonexistent-org/nonexistent-model.*HF_HUB_OFFLINE"):
        Qwen2VLImageProcessor.from_pretrained("nonexistent-org/nonexistent-model", cache_dir=str(tmp_path),
                                              local_files_only=True)
    with pytest.raises(ValueError, match="does not exist"):
        Qwen2VLImageProcessor.from_pretrained(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ValueError, match="preprocessor_config.json not found"):
        Qwen2VLImageProcessor.from_pretrained(tmp_path)


def test_string_inputs_apply_exif(tmp_path):
    """Paths go through media.load_image: EXIF orientation is applied before processing."""
    img = Image.fromarray(smooth(40, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.png"
    img.save(path, exif=exif)
    out = Qwen2VLImageProcessorPil()(str(path), return_tensors="np")
    expected = Qwen2VLImageProcessorPil()(img.transpose(Image.Transpose.ROTATE_270), return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], expected["image_grid_thw"])
    np.testing.assert_array_equal(out["pixel_values"], expected["pixel_values"])


def test_bad_inputs():
    proc = Qwen2VLImageProcessor()
    with pytest.raises(ValueError, match="zero size"):
        proc(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="channel dimension"):
        proc(np.zeros((10, 10, 7), np.uint8))
    with pytest.raises(ValueError, match="No images"):
        proc([])
    with pytest.raises(ValueError, match="not a multiple"):
        proc(smooth(30, 30), do_resize=False)
    with pytest.warns(UserWarning, match="do_rescale=False"):
        proc(np.random.rand(30, 30, 3).astype(np.float32))
