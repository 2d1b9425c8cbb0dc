"""Hand-computed M-RoPE positions and vision position order."""
import torch

from qwen2vl.model.rope_index import get_rope_index, vision_cu_seqlens, vision_position_ids
from tiny import IMG, VE, VID, VS, left_pad, mm_token_type_ids, oracle_from, tiny_model


def rope(ids, img=None, vid=None, mask=None, merge=2):
    return get_rope_index(torch.tensor(ids) if not torch.is_tensor(ids) else ids,
                          None if img is None else torch.tensor(img), None if vid is None else torch.tensor(vid),
                          mask, image_token_id=IMG, video_token_id=VID, spatial_merge_size=merge)


def test_vision_position_order_block_major():
    pos = vision_position_ids(torch.tensor([[1, 4, 6]]), 2)
    assert pos[:, 0].tolist() == [0, 0, 1, 1] * 3 + [2, 2, 3, 3] * 3
    assert pos[:, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5] * 2
    # Repeated for every temporal patch, restarting per item.
    pos = vision_position_ids(torch.tensor([[2, 2, 2], [1, 2, 2]]), 2)
    assert pos[:, 0].tolist() == [0, 0, 1, 1] * 3 and pos[:, 1].tolist() == [0, 1, 0, 1] * 3
    assert vision_cu_seqlens(torch.tensor([[2, 2, 2], [1, 4, 6]])).tolist() == [0, 4, 8, 32]


def test_text_only_left_padded():
    ids, mask = left_pad([[7, 8, 9], [7]])
    pos, delta = rope(ids, mask=mask)
    assert pos[0].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert (pos[0] == pos[1]).all() and (pos[0] == pos[2]).all()
    assert delta.tolist() == [[0], [0]]


def test_image_then_text_hand_computed():
    # t t VS IMG*6 (grid 1x4x6, merge 2 → 1x2x3) VE t
    ids = [[7, 8, VS] + [IMG] * 6 + [VE, 9]]
    pos, delta = rope(ids, img=[[1, 4, 6]])
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
    assert delta.tolist() == [[7 + 1 - 11]]


def test_long_video_continues_after_block_max():
    """t > max(h,w)/2: text after the video continues at (max position of the block) + 1 — the rule the
    checkpoints were trained with. transformers 5.x would restart at start + max(h,w)/2 = 2 + 2 = 4."""
    ids = [[7, VS] + [VID] * 16 + [VE, 9]]          # video grid 4x4x4 → 4 x 2 x 2 tokens
    pos, delta = rope(ids, vid=[[4, 4, 4]])
    t_row = pos[0, 0].tolist()
    assert t_row[:2] == [0, 1]
    assert t_row[2:18] == [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4
    assert pos[1, 0, 2:6].tolist() == [2, 2, 3, 3] and pos[2, 0, 2:6].tolist() == [2, 3, 2, 3]
    assert pos[:, 0, 18].tolist() == [6, 6, 6]          # VE right after the block max (5) + 1
    assert pos[:, 0, 19].tolist() == [7, 7, 7]
    assert delta.tolist() == [[7 + 1 - 20]]


def test_reference_worked_example_with_left_padding():
    """REFERENCE §3.3 example (image 1x4x6, video 3x4x4, left padded by 2). Positions before the video and
    inside it are those of the reference; after the video ours continue at block max + 1 = 12."""
    seq = [7, 8, VS] + [IMG] * 6 + [VE, 9, VS] + [VID] * 12 + [VE, 10, 11]
    ids, mask = left_pad([seq, [7] * (len(seq) + 2)])
    pos, delta = rope(ids, img=[[1, 4, 6]], vid=[[3, 4, 4]], mask=mask)
    t = pos[0, 0].tolist()
    assert t[:2] == [0, 0]
    assert t[2:14] == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert t[14:26] == [9] * 4 + [10] * 4 + [11] * 4
    assert t[26:] == [12, 13, 14]
    assert pos[1, 0, 14:18].tolist() == [9, 9, 10, 10] and pos[2, 0, 14:18].tolist() == [9, 10, 9, 10]
    assert delta[0].item() == 14 + 1 - 27


def test_two_adjacent_images_without_separator_split_by_grids():
    ids = [[7] + [IMG] * 4 + [IMG] * 2 + [8]]
    pos, _ = rope(ids, img=[[1, 4, 4], [1, 2, 4]])
    assert pos[0, 0].tolist() == [0, 1, 1, 1, 1, 3, 3, 5]
    assert pos[2, 0].tolist() == [0, 1, 2, 1, 2, 3, 4, 5]


def test_images_only_match_oracle_rope_index():
    model = tiny_model(merge_size=2, mrope_section=(4, 2, 2))
    hf = oracle_from(model)
    seq = [7, 8, VS] + [IMG] * 6 + [VE, 9, VS] + [IMG] * 4 + [VE, 10]
    ids, mask = left_pad([seq, [7, 8, 9]])
    grid = torch.tensor([[1, 4, 6], [1, 4, 4]])
    ours, d_ours = model.get_rope_index(ids, grid, None, mask)
    ref, d_ref = hf.model.get_rope_index(ids, mm_token_type_ids(ids), grid, None, mask)
    real = mask.bool()
    assert torch.equal(ours[:, real], ref[:, real])
    assert torch.equal(d_ours, d_ref)

