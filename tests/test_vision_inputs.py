"""The one validator of vision inputs (`qwen2vl.vision_inputs`) and the engine's use of it: each mismatch is a
ValueError (RequestRejected in the engine) naming the problem."""
from types import SimpleNamespace

import pytest
import torch

from qwen2vl.engine.prompts import InputProcessor
from qwen2vl.engine.sequence import RequestRejected
from qwen2vl.vision_inputs import check_media, check_placeholders, placeholder_count

GRID = torch.tensor([[1, 4, 6], [2, 2, 2]])  # 24 + 8 patches
WIDTH = 3 * 2 * 4 * 4


def test_consistent_inputs_pass():
    assert check_media("image", torch.zeros(32, WIDTH), GRID, 2, WIDTH) == [[1, 4, 6], [2, 2, 2]]
    assert check_media("video", None, None, 2) == []
    assert placeholder_count(GRID, 2) == 8 and placeholder_count(None, 2) == 0
    check_placeholders("image", 8, GRID, 2)


@pytest.mark.parametrize("pixels, grid, message", [
    (torch.zeros(32, WIDTH), None, "pixel_values was given without image_grid_thw"),
    (None, GRID, "image_grid_thw was given without pixel_values"),
    (torch.zeros(32, WIDTH), GRID[0], r"image_grid_thw must be a \(num_items, 3\) tensor"),
    (torch.zeros(24, WIDTH), torch.tensor([[1, 3, 8]]), "multiples of spatial_merge_size=2"),
    (torch.zeros(24, WIDTH), torch.tensor([[0, 4, 6]]), "must be > 0"),
    (torch.zeros(31, WIDTH), GRID, r"must be \(32, 96\)"),
    (torch.zeros(32, WIDTH + 1), GRID, r"must be \(32, 96\)"),
    (torch.zeros(32), GRID, r"must be \(32, 96\)"),
])
def test_each_mismatch_is_named(pixels, grid, message):
    with pytest.raises(ValueError, match=message):
        check_media("image", pixels, grid, 2, WIDTH)


def test_placeholder_count_mismatch():
    with pytest.raises(ValueError, match="7 video placeholder tokens but the video inputs give 8 features"):
        check_placeholders("video", 7, GRID, 2)


def test_engine_rejects_what_the_validator_refuses():
    vc = SimpleNamespace(spatial_merge_size=2, in_channels=3, temporal_patch_size=2, patch_size=4)
    proc = InputProcessor(None, SimpleNamespace(image_token_id=5, video_token_id=6, vision_config=vc))
    ok = proc.process({"prompt_token_ids": [1] + [5] * 8, "pixel_values": torch.zeros(32, WIDTH),
                       "image_grid_thw": GRID})
    assert ok.mm.image_hashes and len(ok.mm.image_hashes) == 2
    with pytest.raises(RequestRejected, match="patches|must be"):
        proc.process({"prompt_token_ids": [1] + [5] * 8, "pixel_values": torch.zeros(30, WIDTH),
                      "image_grid_thw": GRID})
    with pytest.raises(RequestRejected, match="9 image placeholder tokens"):
        proc.process({"prompt_token_ids": [5] * 9, "pixel_values": torch.zeros(32, WIDTH), "image_grid_thw": GRID})
    with pytest.raises(RequestRejected, match="without pixel_values_videos"):
        proc.process({"prompt_token_ids": [1], "video_grid_thw": GRID})
