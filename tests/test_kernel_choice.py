"""The per-op backend chooser (qwen2vl/kernels/choose.py): every forced backend of every op gives the torch
reference's result, the chooser times and picks a valid, exact candidate on this machine and records it, a second
load reads the record instead of timing, and test-sized models are never timed."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from qwen2vl.kernels import choose, cpu, cpu_ops
from qwen2vl.kernels.prepacked import PrepackedLinear
from qwen2vl.model.attention import sdpa_attention, torch_sdpa
from qwen2vl.model.vision import VisionAttention, vision_rotary
from qwen2vl.quantization import Int8WeightOnlyLinear


@pytest.fixture(autouse=True)
def fresh_chooser(monkeypatch, tmp_path):
    cpu.library()  # built (or found) in the real cache before the cache dir moves
    monkeypatch.setenv("QWEN2VL_CACHE", str(tmp_path))
    monkeypatch.delenv(choose.ENV, raising=False)
    monkeypatch.delenv(choose.BUDGET_ENV, raising=False)
    choose.reset()
    yield
    choose.reset()


def force(monkeypatch, spec: str) -> None:
    monkeypatch.setenv(choose.ENV, spec)
    choose.reset()


def close(y: torch.Tensor, ref: torch.Tensor, tol: float = 2 ** -7) -> bool:
    """Within bf16 rounding of the fp32 reference (relative to its largest value): a wrong path fails."""
    return y.shape == ref.shape and (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_backend_setting_parsed_and_bad_items_named(monkeypatch):
    for spec, want in [("", {}), ("auto", {}), ("kernels", {op: "kernel" for op in choose.OPS}),
                       ("torch,decode_gemv=kernel", {**{op: "torch" for op in choose.OPS}, "decode_gemv": "kernel"}),
                       ("vision_linear=widened, int8_gemv=torch", {"vision_linear": "widened", "int8_gemv": "torch"})]:
        monkeypatch.setenv(choose.ENV, spec)
        assert choose.forced() == want, spec
    for spec, named in [("fast", "'fast'"), ("gemv=torch", "'gemv'"), ("decode_gemv=onednn", "decode_gemv")]:
        monkeypatch.setenv(choose.ENV, spec)
        with pytest.raises(ValueError, match=named):
            choose.forced()
    monkeypatch.setenv(choose.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=choose.BUDGET_ENV):
        choose.budget()


@pytest.mark.parametrize("spec", ["kernels", "torch", "prefill_linear=widened", "prefill_linear=chunked"])
def test_text_linear_every_backend_matches_reference(monkeypatch, spec):
    force(monkeypatch, spec)
    w, b = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    for rows in (1, 3, 8, 20, 80):
        x = torch.randn(rows, 64).bfloat16()
        ref = F.linear(x.float(), w.float(), b.float())
        assert close(cpu.linear(x, w, b), ref), (spec, rows)
        if spec == "kernels":  # forced kernels = today's rule, bit for bit
            assert torch.equal(cpu.linear(x, w, b), cpu._linear_today(x, w, b))
        if spec == "torch":
            assert torch.equal(cpu.linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("route", ["kernels", "onednn", "torch", "widened"])
def test_vision_linear_every_backend_matches_reference(monkeypatch, route):
    force(monkeypatch, route if route in ("kernels", "torch") else f"vision_linear={route}")
    lin = PrepackedLinear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        for rows in (10, 80, 300):
            x = torch.randn(rows, 64).bfloat16()
            ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            assert close(lin(x), ref), (route, rows)
            assert close(lin(x, with_bias=False), F.linear(x.float(), lin.weight.float()))


@pytest.mark.parametrize("route", ["kernels", "torch", "vision_attention=torch_fp32"])
def test_vision_attention_every_backend_matches_reference(monkeypatch, route):
    force(monkeypatch, route)
    att = VisionAttention(64, 4).eval()  # head_dim 16: the kernel's smallest
    x = torch.randn(300, 64)
    cos, sin = vision_rotary(torch.randint(0, 20, (300, 2)), 16)
    cu = torch.tensor([0, 120, 300], dtype=torch.int32)
    with torch.no_grad():
        ref = att(x, cu, cos, sin)  # fp32 module: the torch path, the reference
        got = att.to(torch.bfloat16)(x.bfloat16(), cu, cos, sin)
    assert close(got, ref, 2 ** -5), route  # attention of bf16 operands: a few bf16 roundings deep


@pytest.mark.parametrize("route", ["kernels", "torch"])
def test_text_attention_every_backend_matches_reference(monkeypatch, route):
    force(monkeypatch, route)
    q, k, v = torch.randn(2, 4, 80, 32), torch.randn(2, 2, 80, 32), torch.randn(2, 2, 80, 32)
    for qs in (q, q[:, :, -1:]):  # prefill (S >= 64) and decoding (one query)
        ref = torch_sdpa(qs, k, v, None, 0.2)
        got = sdpa_attention(qs.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.2)
        assert close(got, ref, 2 ** -5), (route, qs.shape)


@pytest.mark.parametrize("route", ["kernels", "torch"])
def test_int8_every_backend_matches_reference(monkeypatch, route):
    force(monkeypatch, route)
    q = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 96).bfloat16())
    with torch.no_grad():
        for rows in (1, 4, 12):
            x = torch.randn(rows, 64).bfloat16()
            ref = F.linear(x.float(), q.dequantized_weight().float(), q.bias.float())
            assert close(q(x), ref), (route, rows)


def test_fused_decoding_only_where_the_kernels_are_chosen(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_model

    model = tiny_model(mrope_section=(8, 4, 4)).to(torch.bfloat16)  # head_dim 32, hidden 128
    calls = []
    original = cpu_ops.decode_layers
    monkeypatch.setattr(cpu_ops, "decode_layers", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(7, 90, (1, 6))
    for spec in ("kernels", "decode_gemv=torch", "decode_attention=torch"):
        force(monkeypatch, spec)
        calls.clear()
        with torch.inference_mode():
            model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert bool(calls) == (spec == "kernels" and cpu.has_bf16_gemv()), spec


def test_chooser_times_picks_records_and_a_second_load_reads_it(monkeypatch, tmp_path):
    monkeypatch.setattr(choose, "MIN_WEIGHT", 0)  # time this small shape (a real model's are slower to time)
    monkeypatch.setattr(choose, "STEADY", math.inf)  # a busy shared machine must not leave it unrecorded
    w = torch.randn(512, 256).bfloat16()
    x = torch.randn(1, 256).bfloat16()
    with torch.inference_mode():
        y = cpu.linear(x, w)
    assert close(y, F.linear(x.float(), w.float()))
    (key, decision), = [(k, d) for k, d in choose._memo.items() if k[0] == "decode_gemv"]
    assert decision.source == "measured" and decision.choice in choose.OPS["decode_gemv"]
    assert set(decision.times_ms) == ({"kernel", "torch"} if cpu.has_bf16_gemv() else {"torch"})
    recorded = json.loads((tmp_path / "kernels" / "choices.json").read_text())
    assert recorded[choose.machine_key()] == {"decode_gemv|1,512,256,0": decision.choice}
    assert choose.summary()["decode_gemv"] == f"{decision.choice} (measured) 1x512x256x0"

    choose.reset()  # a second load: the record is read, nothing is timed
    monkeypatch.setattr(choose, "_measure", lambda trial: pytest.fail("timed again"))
    with torch.inference_mode():
        assert close(cpu.linear(x, w), F.linear(x.float(), w.float()))
    assert choose._memo[key] == choose.Decision(decision.choice, "cached", {}) and choose._measured == 0


def test_chooser_skips_inexact_candidates_and_keeps_within_budget(monkeypatch):
    import time

    def slow_exact():
        time.sleep(0.002)
        return torch.ones(4)

    trial = choose.Trial({"kernel": lambda: torch.full((4,), 1.5), "torch": slow_exact}, lambda: torch.ones(4))
    assert choose.decide("decode_gemv", (1, 2, 3), lambda: trial) == "torch"  # the fast wrong one is not picked
    monkeypatch.setattr(choose, "BUDGET_S", 0.0)
    choose.reset()
    assert choose.decide("decode_gemv", (1, 2, 3, 4), lambda: pytest.fail("timed over budget")) is None
    assert choose._memo[("decode_gemv", (1, 2, 3, 4))].source == "budget"


def test_test_sized_models_are_never_timed(monkeypatch):
    """Tiny models run today's rules untimed, so the tests stay fast and bit-identical to before."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import pixels, tiny_model

    monkeypatch.setattr(choose, "_measure", lambda trial: pytest.fail("a test-sized shape was timed"))
    model = tiny_model(mrope_section=(8, 4, 4)).to(torch.bfloat16)
    grid = torch.tensor([[1, 16, 18]])
    with torch.inference_mode():
        model.model.visual(pixels(grid.tolist()).bfloat16(), grid)
        model.generate(input_ids=torch.randint(7, 90, (2, 70)), max_new_tokens=2, do_sample=False)
    assert choose._memo and all(d.source == "untimed" for d in choose._memo.values())


def test_chooser_times_the_widened_and_chunked_products_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(cpu, "has_native_bf16_matmul", lambda: False)
    monkeypatch.setattr(choose, "MIN_WEIGHT", 0)
    monkeypatch.setattr(choose, "STEADY", math.inf)
    w, b = torch.randn(512, 256).bfloat16(), torch.randn(512).bfloat16()
    for rows, want in ((20, {"chunked", "widened", "torch"}), (100, {"widened", "torch"})):
        x = torch.randn(rows, 256).bfloat16()
        with torch.inference_mode():
            assert close(cpu.linear(x, w, b), F.linear(x.float(), w.float(), b.float()))
        d = choose._memo[("prefill_linear", (choose.rows_class("prefill_linear", rows), 512, 256, 1))]
        assert d.source == "measured" and d.choice in want
        assert set(d.times_ms) == (want if cpu.has_bf16_gemv() else want - {"chunked"})
