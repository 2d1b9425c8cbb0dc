"""The fused CPU decoding step (qwen2vl/model/fused_decode.py): one kernel call through all decoder layers is
bit-identical to the per-op path (same kernels, same order), and everything it cannot do takes the per-op path."""
import pytest
import torch

from qwen2vl.engine.runner import ModelWorker
from qwen2vl.kernels.backend import KernelLinear
from qwen2vl.kernels import cpu, cpu_ops
from qwen2vl.model import text
from qwen2vl.quantization import quantize_model

from tiny import left_pad, tiny_model

needs_bf16_kernels = pytest.mark.skipif(not cpu.has_bf16_gemv(),
                                        reason="needs the CPU kernels' bf16 GEMV (AVX512-BF16 or the AVX2 build)")


def kernel_friendly_model(seed: int = 0):
    """3 layers, hidden 64 (4 heads x 16, 2 kv heads), MLP 96: every width a multiple of 32 as the kernels need;
    weights and biases ~N(0, 0.2) so logits spread."""
    m = tiny_model(seed=seed, mrope_section=(4, 2, 2), layers=3, intermediate=96, tie=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in [*m.model.language_model.named_parameters(), *m.lm_head.named_parameters()]:
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return m.to(torch.bfloat16)


@pytest.fixture(scope="module")
def model():
    return kernel_friendly_model()


@pytest.fixture
def spy(monkeypatch):
    """Counts decode_layers calls that ran (returned True)."""
    calls = []
    original = cpu_ops.decode_layers
    monkeypatch.setattr(cpu_ops, "decode_layers", lambda *a: calls.append(original(*a)) or calls[-1])
    return calls


def decode(model, ids, mask, steps: int):
    """Prefill + `steps` greedy decoding forwards; the logits of every step and the final cache."""
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits), cache


def per_op(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(text, "fused_decode_step", lambda *a: None)
        return fn(*args)


@needs_bf16_kernels
@pytest.mark.parametrize("rows", [[[15, 17, 33, 8, 61, 12, 9]],
                                  [[15, 17, 33, 8, 61, 12, 9], [44, 13, 70], [7, 7, 21, 90, 51]],
                                  [[15, 17, 33], [44, 13, 70, 9], [7, 21], [90, 51, 8, 8], [12], [30, 31]]],
                         ids=["1 row", "3 rows (4-row kernel blocks)", "6 rows (3-row kernel blocks)"])
def test_fused_step_is_bit_identical_to_per_op_path(model, spy, monkeypatch, rows):
    ids, mask = left_pad(rows)  # the batches are left-padded: the step's attention mask is used
    fused, cache_f = decode(model, ids, mask, steps=6)
    assert spy == [True] * 6
    ref, cache_r = per_op(monkeypatch, decode, model, ids, mask, 6)
    assert torch.equal(fused, ref)
    assert cache_f.lengths == cache_r.lengths and cache_f.real_lengths == cache_r.real_lengths
    for a, b in zip(cache_f.keys + cache_f.values, cache_r.keys + cache_r.values):
        assert torch.equal(a, b)
    assert fused.float().std() > 0.5  # the logits are not degenerate


@needs_bf16_kernels
def test_fused_step_bits_do_not_depend_on_the_thread_count(model, spy):
    """The bf16 step is one parallel region whose phases split GEMV rows and (row, KV head) pairs among the team
    (every thread keeps its own residual copy): 1 or 3 threads give the same logits and cache."""
    ids, mask = left_pad([[15, 17, 33, 8, 61, 12, 9], [44, 13, 70], [7, 7, 21, 90, 51]])
    threads, runs = torch.get_num_threads(), []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            runs.append(decode(model, ids, mask, steps=3))
    finally:
        torch.set_num_threads(threads)
    assert spy == [True] * 6
    for logits, cache in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(cache.keys + cache.values, runs[0][1].keys + runs[0][1].values))


@needs_bf16_kernels
def test_fused_step_rows_of_different_lengths_engine_worker(model, spy, monkeypatch):
    """The engine's decode: rows hold different numbers of tokens (no attention_mask) in a fixed-size cache."""
    def run():
        worker = ModelWorker(model, max_num_seqs=3, max_model_len=32)
        for row, ids in enumerate([[15, 17, 33, 8, 61, 12, 9], [44, 13, 70], [7, 7, 21, 90, 51]]):
            worker.prefill(ids, {}, row)
        out = [worker.decode([11, 12, 13], 3) for _ in range(3)] + [worker.decode([40, 41], 2)]
        return out, worker.cache

    fused, cache_f = run()
    assert spy == [True] * 4
    ref, cache_r = per_op(monkeypatch, run)
    assert all(torch.equal(a, b) for a, b in zip(fused, ref))
    assert all(torch.equal(a, b) for a, b in zip(cache_f.keys + cache_f.values, cache_r.keys + cache_r.values))


@needs_bf16_kernels
def test_fused_step_full_cache_raises_like_per_op_path(model, spy):
    worker = ModelWorker(model, max_num_seqs=1, max_model_len=4)
    worker.prefill([15, 17, 33, 8], {}, 0)
    with pytest.raises(ValueError, match="KV cache is full"):
        worker.decode([11], 1)
    assert spy == []


@needs_bf16_kernels
def test_fused_step_generate_equals_per_op_generate(model, spy, monkeypatch):
    ids, mask = left_pad([[15, 17, 33, 8, 61, 12, 9], [44, 13, 70]])
    with torch.no_grad():
        fused = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert spy and all(spy)
    with torch.no_grad():
        ref = per_op(monkeypatch, lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                                         do_sample=False))
    assert torch.equal(fused, ref)


@needs_bf16_kernels
@pytest.mark.parametrize("case", ["hook", "grad", "eager", "fp32", "int8", "nine_rows", "replaced_module"])
def test_fused_step_declines_what_it_cannot_do(case, spy, monkeypatch):
    """Each case takes the per-op path (decode_layers never runs) and still gives that path's result."""
    model = kernel_friendly_model()
    rows = [[15, 17, 33, 8, 61, 12, 9], [44, 13, 70]]
    if case == "hook":
        seen = []
        model.model.language_model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
    elif case == "eager":
        model.model.language_model.set_attn_implementation("eager")
    elif case == "fp32":
        model = model.float()
    elif case == "int8":
        quantize_model(model)
    elif case == "nine_rows":
        rows = [[15 + i, 17, 33, 8][: 2 + i % 3] for i in range(9)]
    elif case == "replaced_module":
        decode(model, *left_pad(rows), 1)  # plan the layers first, then swap one projection for a plain Linear
        spy.clear()
        old = model.model.language_model.layers[0].mlp.up_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False).to(torch.bfloat16)
        new.weight.data.copy_(old.weight)
        model.model.language_model.layers[0].mlp.up_proj = new
    ids, mask = left_pad(rows)
    if case == "grad":
        with torch.enable_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                  past_key_values=out.past_key_values, use_cache=True)
        assert spy == []
        return
    got, _ = decode(model, ids, mask, steps=3)
    assert spy == []
    ref, _ = per_op(monkeypatch, decode, model, ids, mask, 3)
    assert torch.equal(got, ref)
    if case == "hook":
        assert len(seen) == 8  # prefill + 3 steps, both runs


@needs_bf16_kernels
def test_fused_step_follows_a_swapped_projection(spy):
    """A projection replaced by another kernel Linear (e.g. merged adapter weights) is picked up: the fused step
    uses the new weights (its output changes like the per-op path's) instead of the planned module's."""
    model = kernel_friendly_model()
    ids, mask = left_pad([[15, 17, 33, 8, 61, 12, 9]])
    before, _ = decode(model, ids, mask, 2)
    layer = model.model.language_model.layers[1]
    new = KernelLinear(layer.mlp.down_proj.in_features, layer.mlp.down_proj.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(-layer.mlp.down_proj.weight)
    layer.mlp.down_proj = new.to(torch.bfloat16)
    spy.clear()
    after, _ = decode(model, ids, mask, 2)
    assert spy == [True, True] and not torch.equal(before, after)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.weight.neg_()  # back to the original values
    again, _ = decode(model, ids, mask, 2)
    assert torch.equal(again, before)


@needs_bf16_kernels
def test_decode_layers_kernel_refuses_bad_shapes_without_writing():
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    before = x.clone()
    kc = torch.zeros(1, 2, 8, 24, dtype=torch.bfloat16)  # head dim 24: not a multiple of 16
    hq, hkv, d, inter = 4, 2, 24, 96
    shapes = [(64,), (hq * d, 64), (hq * d,), (hkv * d, 64), (hkv * d,), (hkv * d, 64), (hkv * d,), (64, hq * d),
              (64,), (inter, 64), (inter, 64), (64, inter)]
    w = [torch.ones(s, dtype=torch.bfloat16) for s in shapes]
    cs = torch.ones(1, d, dtype=torch.bfloat16)
    assert not cpu_ops.decode_layers(x, w, [kc], [kc.clone()], [0], 1, None, cs, cs, hq, 1e-6, 0.2)  # in C
    w[10] = torch.ones(inter, 32, dtype=torch.bfloat16)
    assert not cpu_ops.decode_layers(x, w, [kc], [kc.clone()], [0], 1, None, cs, cs, hq, 1e-6, 0.2)  # shape
    assert torch.equal(x, before) and not kc.any()
