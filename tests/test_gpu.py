"""CUDA paths; the whole module is skipped without a CUDA GPU (CI has none: these run when a GPU machine is lent).

* FlashAttention-2 varlen (flash-attn, or PyTorch's built-in `varlen_attn`) for the vision tower and the text
  decoder against an fp32 reference: segments of several lengths, left pads, cached keys (causal aligned to the
  last key), GQA. bf16 tolerance: no worse than twice SDPA's own bf16 error + 2e-3.
* The model on CUDA (fp32, TF32 off) against the transformers oracle on CUDA: logits within 1e-4, greedy tokens
  equal; the model loaded with device_map="cuda" (and flash_attention_2 in bf16).
* `generate(compile=True)` on CUDA: CUDA graphs are used, tokens equal to eager decoding (fp32), and the number of
  host syncs does not grow with the number of new tokens (none per step).
* Weight-only int8 on CUDA equals the same int8 model on the CPU.
"""
import copy
import warnings

import pytest
import torch

from test_generation import model  # noqa: F401  (fixture: the tiny model with std-0.2 weights, on the CPU)
from tiny import IMG, PAD, left_pad, mm_token_type_ids, oracle_from, pixels, sample, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MERGE = 2
NO_EOS = 1000


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def mixed_batch():
    """Left-padded batch: image prompt, text prompt, two-image prompt; media on the CPU."""
    grids = [[1, 4, 4], [1, 2, 2], [1, 2, 4]]
    seqs = [sample(2, [("image", grids[0])], 3, MERGE, seed=1), sample(6, [], 2, MERGE, seed=2),
            sample(1, [("image", grids[1]), ("image", grids[2])], 1, MERGE, seed=3)]
    ids, mask = left_pad(seqs)
    return ids, mask, dict(pixel_values=pixels(grids, seed=4), image_grid_thw=torch.tensor(grids))


def cuda(kw):
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}


def reference_attention(q, k, v, allowed, scale):
    """fp32 softmax attention. q (B,Hq,S,D), k/v (B,Hkv,K,D), allowed (B,1,S,K) bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = (q.float() @ k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


# --------------------------------------------------------------------------------------------- flash attention
def test_flash_vision_attention_matches_reference():
    from qwen2vl.model.attention import vision_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [64, 100, 7, 256, 100]
    n, h, d = sum(lens), 16, 80
    q, k, v = (torch.randn(n, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    scale = d ** -0.5
    ref = torch.empty(n, h, d, device="cuda")
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        allowed = torch.ones(1, 1, b - a, b - a, dtype=torch.bool, device="cuda")
        ref[a:b] = reference_attention(*seg, allowed, scale)[0].transpose(0, 1)
    fa = vision_attention("flash_attention_2", q, k, v, cu, scale)
    sd = vision_attention("sdpa", q, k, v, cu, scale)
    err_fa, err_sd = ((x.float() - ref).abs().max().item() for x in (fa, sd))
    assert fa.shape == (n, h, d) and fa.dtype == torch.bfloat16
    assert err_fa <= 2 * err_sd + 2e-3, (err_fa, err_sd)


@pytest.mark.parametrize("s", [5, 1], ids=["prefill_after_cache", "decode"])
def test_flash_text_attention_pads_cache_gqa(s):
    """Rows with left-padded keys and queries, 6 cached keys before the s new ones, 12 query / 2 KV heads."""
    from qwen2vl.model.attention import text_attention

    g = torch.Generator(device="cuda").manual_seed(1)
    b, hq, hkv, d, past = 3, 12, 2, 128, 6
    kl = past + s
    q = torch.randn(b, hq, s, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, kl, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    pads = torch.tensor([0, 3, 5], device="cuda")                      # left pads per row (in the cache)
    slots = torch.arange(kl, device="cuda")
    key_valid = slots[None, :] >= pads[:, None]                         # (B,K)
    query_valid = torch.ones(b, s, dtype=torch.bool, device="cuda")
    causal = slots[None, :] <= (past + torch.arange(s, device="cuda"))[:, None]   # (S,K) bottom-right
    allowed = (key_valid[:, None, :] & causal[None])[:, None]          # (B,1,S,K)
    scale = d ** -0.5
    ref = reference_attention(q, k, v, allowed, scale)
    fa = text_attention("flash_attention_2", q, k, v, allowed, scale, key_valid, query_valid)
    sd = text_attention("sdpa", q, k, v, allowed, scale)
    err_fa, err_sd = ((x.float() - ref).abs().max().item() for x in (fa, sd))
    assert fa.shape == q.shape
    assert err_fa <= 2 * err_sd + 2e-3, (err_fa, err_sd)


@pytest.mark.parametrize("padded", [True, False], ids=["left_padded_batch", "no_pads"])
def test_flash_attention_2_model_matches_sdpa_prefill_and_decode(padded):
    """bf16 tiny model, flash_attention_2 vs sdpa vs an fp32 copy: a left-padded mixed batch (packed varlen with
    indices) or one unpadded row (the index-free path), then three decode steps through the KV cache. FA2's
    error against fp32 stays within twice SDPA's + 2e-3 at every position."""
    base = tiny_model(merge_size=MERGE, mrope_section=(4, 2, 2)).cuda()
    ids, mask, media = mixed_batch()
    extra = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    if not padded:  # the first row alone: image prompt, no pads
        real = mask[0].bool()
        ids, mask, extra = ids[:1, real], mask[:1, real], extra[:1]
        media = dict(pixel_values=media["pixel_values"][:16], image_grid_thw=media["image_grid_thw"][:1])
    ids, mask, extra, media = ids.cuda(), mask.cuda(), extra.cuda(), cuda(media)

    def run(model, dtype):
        kw = dict(media, pixel_values=media["pixel_values"].to(dtype))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, **kw)
            logits, cache = [out.logits.float()], out.past_key_values
            for j in range(extra.shape[1]):
                m = torch.cat([mask, torch.ones_like(extra[:, :j + 1])], 1)
                o = model(input_ids=extra[:, j:j + 1], attention_mask=m, past_key_values=cache)
                logits.append(o.logits.float())
        return logits

    ref = run(base, torch.float32)
    bf = copy.deepcopy(base).to(torch.bfloat16)
    sd = run(bf, torch.bfloat16)
    bf.set_attn_implementation("flash_attention_2")
    fa = run(bf, torch.bfloat16)
    real = mask.bool()
    for j, (r, a, f) in enumerate(zip(ref, sd, fa)):
        keep = real if j == 0 else torch.ones(r.shape[:2], dtype=torch.bool, device="cuda")
        err_sd, err_fa = (a - r)[keep].abs().max().item(), (f - r)[keep].abs().max().item()
        assert err_fa <= 2 * err_sd + 2e-3, (j, err_fa, err_sd)


def test_load_on_cuda_with_flash_attention_2(model, tmp_path):
    from qwen2vl import Qwen2VLForConditionalGeneration

    model.save_pretrained(tmp_path)
    m = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, device_map="cuda", dtype="bfloat16",
                                                        attn_implementation="flash_attention_2", progress=False)
    assert {p.device.type for p in m.parameters()} == {"cuda"} and m.lm_head.weight.dtype == torch.bfloat16
    ids, mask, media = mixed_batch()
    out = m.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False,
                     eos_token_id=NO_EOS, **cuda(dict(media, pixel_values=media["pixel_values"].bfloat16())))
    assert out.shape == (3, ids.shape[1] + 8) and out.device.type == "cuda"
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, device_map="cuda", dtype="float32",
                                                        attn_implementation="flash_attention_2", progress=False)


# --------------------------------------------------------------------------------------------- oracle parity
@pytest.fixture(scope="module")
def pair(model):
    return copy.deepcopy(model).cuda(), oracle_from(model, attn="eager").cuda()


def test_cuda_forward_matches_oracle_on_cuda(pair):
    ours, hf = pair
    ids, mask, media = mixed_batch()
    ids, mask, media = ids.cuda(), mask.cuda(), cuda(media)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, use_cache=False, **media).logits
        b = hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids), **media).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_greedy_generate_matches_oracle_on_cuda(pair, compile):
    """Greedy tokens on CUDA equal transformers' on CUDA, for eager and CUDA-graph (`compile=True`) decoding."""
    from qwen2vl.model.static_decode import get_static_decoder

    ours, hf = pair
    ids, mask, media = mixed_batch()
    ids, mask, media = ids.cuda(), mask.cuda(), cuda(media)
    new = 24
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                        eos_token_id=NO_EOS, compile=compile, **media)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                          max_new_tokens=new, do_sample=False, eos_token_id=NO_EOS, pad_token_id=PAD, **media)
    assert torch.equal(out, ref), (out[:, ids.shape[1]:].tolist(), ref[:, ids.shape[1]:].tolist())
    assert len(set(out[0, ids.shape[1]:].tolist())) > 3
    if compile:
        assert get_static_decoder(ours, 3, ids.shape[1] + new).uses_cuda_graphs


def test_compiled_decode_has_no_per_step_host_sync(pair):
    """With CUDA's sync debug mode on, a compiled generate of 40 new tokens makes no more synchronising calls than
    one of 8 (same graph; prefill and the final read-back are the only syncs)."""
    ours, _ = pair
    ids = torch.tensor([sample(5, [], 4, MERGE, seed=9)], device="cuda")

    def syncs(new):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ours.generate(input_ids=ids, max_new_tokens=new, do_sample=False, eos_token_id=NO_EOS,
                              compile=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    syncs(40)  # compile and capture outside the count
    few, many = syncs(8), syncs(40)
    assert few >= 1, "the sync counter saw nothing (the final read-back of the output syncs)"
    assert many <= few, (few, many)


# --------------------------------------------------------------------------------------------- int8
def test_int8_on_cuda_equals_int8_on_cpu():
    from qwen2vl.quantization import quantize_model

    q = quantize_model(tiny_model(seed=3, merge_size=MERGE, mrope_section=(4, 2, 2)))
    ids = torch.tensor([sample(12, [("image", [1, 4, 4])], 6, MERGE, seed=11)])
    kw = dict(pixel_values=pixels([[1, 4, 4]]), image_grid_thw=torch.tensor([[1, 4, 4]]))
    with torch.no_grad():
        cpu = q(input_ids=ids, use_cache=False, **kw).logits
        gpu = q.cuda()(input_ids=ids.cuda(), use_cache=False, **cuda(kw)).logits
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-4
    assert (ids == IMG).any()
