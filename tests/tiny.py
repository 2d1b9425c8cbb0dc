"""Tiny random Qwen2-VL models for tests, and the same weights in the transformers oracle (tests only)."""
from __future__ import annotations

import torch

from qwen2vl.configuration import Qwen2VLConfig
from qwen2vl.model import Qwen2VLForConditionalGeneration

# Token ids of the tiny configs (as the transformers tester: pad 0, vision_start 3, image 4, video 5).
PAD, VS, IMG, VID, VE = 0, 3, 4, 5, 6


def tiny_config(merge_size: int = 2, mrope_section=(2, 1, 1), tie: bool = True, vocab: int = 99,
                layers: int = 2, attn: str = "sdpa", intermediate: int = 37) -> Qwen2VLConfig:
    head_dim = 2 * sum(mrope_section)
    return Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=4 * head_dim, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
                         tie_word_embeddings=tie, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=4 * head_dim, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=merge_size, temporal_patch_size=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=tie, attn_implementation=attn,
    )


def tiny_model(seed: int = 0, **kw) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(tiny_config(**kw)).eval()


def oracle_from(model: Qwen2VLForConditionalGeneration, attn: str = "eager"):
    """A transformers Qwen2VLForConditionalGeneration with exactly our weights."""
    import transformers

    hf_cfg = transformers.Qwen2VLConfig.from_dict(model.config.to_dict())
    hf_cfg._attn_implementation = attn
    hf = transformers.Qwen2VLForConditionalGeneration(hf_cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    w = sd["model.visual.patch_embed.proj.weight"]
    c = model.config.vision_config
    sd["model.visual.patch_embed.proj.weight"] = w.view(w.shape[0], c.in_channels, c.temporal_patch_size,
                                                        c.patch_size, c.patch_size)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "inv_freq" not in k and not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == IMG).long() + 2 * (input_ids == VID).long()


def pixels(grid: list[list[int]], seed: int = 0, patch: int = 14) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3 * 2 * patch * patch, generator=g)


def media(items, seed=0):
    """Prefill kwargs for a list of (kind, grid) items (grids consumed in order)."""
    kw = {}
    img = [g for k, g in items if k == "image"]
    vid = [g for k, g in items if k == "video"]
    if img:
        kw.update(pixel_values=pixels(img, seed=seed), image_grid_thw=torch.tensor(img))
    if vid:
        kw.update(pixel_values_videos=pixels(vid, seed=seed + 1), video_grid_thw=torch.tensor(vid))
    return kw


def sample(text_before: int, grids: list[tuple[str, list[int]]], text_after: int, merge: int, seed: int = 0):
    """Token ids: text, then for each (kind, grid) <vs> placeholders <ve> text, ... (kind 'image'|'video')."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 90, (text_before,), generator=g).tolist()
    for kind, (t, h, w) in grids:
        n = t * h * w // merge ** 2
        ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
        ids += torch.randint(7, 90, (3,), generator=g).tolist()
    ids += torch.randint(7, 90, (text_after,), generator=g).tolist()
    return ids


def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
    return ids, mask


def spread(model: Qwen2VLForConditionalGeneration, std: float, seed: int = 1) -> Qwen2VLForConditionalGeneration:
    """Redraw every weight matrix from N(0, std²). The default init (std 0.02) keeps attention nearly uniform, so
    positions (M-RoPE axes, the vision rotary) barely move the logits; a larger spread makes them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def real_heads_config(layers: int = 2, tie: bool = False, vocab: int = 99) -> Qwen2VLConfig:
    """Few, narrow layers but the real checkpoints' head shapes: text head 128 with mrope_section [16, 24, 24]
    (2 query heads, 1 KV head), vision head 80 (2 heads of embed_dim 160), merge 2."""
    return Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=256, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0,
                         max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=tie, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=2, embed_dim=160, hidden_size=256, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=tie, attn_implementation="sdpa")


def real_heads_model(std: float = 0.1, seed: int = 0, **kw) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    return spread(Qwen2VLForConditionalGeneration(real_heads_config(**kw)).eval(), std, seed + 1)


def write_mp4(path, frames, fps: int = 8, codec: str = "mpeg4"):
    """Encode uint8 RGB frames (T, H, W, 3) as a video file (PyAV); returns the path."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
