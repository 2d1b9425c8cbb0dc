"""Tensor parallelism (issue #8) on 2 CPU processes (gloo) against the single-process model.

The rank programs live at the bottom of this file: `python -m torch.distributed.run ... test_tensor_parallel.py
torchrun DIR OUT` (every rank loads its shards with from_pretrained(tp_plan="auto")) and `python
test_tensor_parallel.py serve DIR OUT` (serve_tensor_parallel: this process is rank 0, one worker is spawned).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import left_pad, pixels, sample, tiny_config  # noqa: E402

from qwen2vl.model import Qwen2VLForConditionalGeneration  # noqa: E402
from qwen2vl.parallel.tp import check_tp_sizes, free_port, text_parameter_count  # noqa: E402

STEPS = 5
HAS_GENERATE = importlib.util.find_spec("qwen2vl.generation") is not None and \
    hasattr(importlib.import_module("qwen2vl.generation"), "generate")


def _config(tie: bool = True):
    cfg = tiny_config(vocab=99, tie=tie)   # vocab 99 is odd: exercises the padded vocab shards
    cfg.text_config.intermediate_size = 36
    return cfg


def _model(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(_config(tie)).eval()


def _inputs():
    merge = 2
    seqs = [sample(3, [("image", [1, 4, 4])], 2, merge, seed=1), sample(7, [], 0, merge, seed=2)]
    ids, mask = left_pad(seqs)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels([[1, 4, 4]]),
                image_grid_thw=torch.tensor([[1, 4, 4]]))


@torch.no_grad()
def greedy(model, steps: int = STEPS):
    """Manual greedy loop on the KV cache: (tokens (B,steps), prefill logits, kv heads held by the cache)."""
    inp = _inputs()
    mask = inp["attention_mask"]
    out = model(**inp, use_cache=True)
    cache, prefill = out.past_key_values, out.logits
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [tok]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    return torch.cat(toks, 1), prefill, cache.keys[0].shape[1]


@torch.no_grad()
def gen(model, sample: bool = False):
    """model.generate: greedy, and (sample=True) sampling from the global RNG without re-seeding: under TP the
    ranks agree only because loading copied rank 0's RNG state everywhere."""
    if not HAS_GENERATE:
        return None
    inp = _inputs()
    out = [model.generate(**inp, max_new_tokens=STEPS, do_sample=False)]
    if sample:
        out.append(model.generate(**inp, max_new_tokens=STEPS, do_sample=True, temperature=1.0))
    return out


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(args, timeout=240):
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for tie in (True, False):
        d = tmp_path_factory.mktemp(f"tp_tie{int(tie)}")
        model = _model(tie)
        model.save_pretrained(d)
        out[tie] = (d, model)
    return out


def test_torchrun_two_ranks_match_single_process(saved, tmp_path):
    """Tied (2B-like) and untied (7B-like) lm_head, in one torchrun run of 2 ranks."""
    torch.set_num_threads(1)
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "torchrun",
          f"{saved[True][0]},{saved[False][0]}", str(tmp_path / "out")])
    for i, tie in enumerate((True, False)):
        ref = saved[tie][1]
        want_tokens, want_logits, full_kv = greedy(ref)
        want_gen = gen(ref)
        res = [torch.load(tmp_path / f"out{i}.rank{r}.pt") for r in range(2)]
        full_text = text_parameter_count(ref)
        full_vision = sum(p.numel() for p in ref.model.visual.parameters())
        for r, got in enumerate(res):
            for key in ("loaded", "parallelized"):
                tokens, logits, kv_heads = got[key]
                assert torch.equal(tokens, want_tokens), (tie, r, key, tokens, want_tokens)
                torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
                assert kv_heads == full_kv // 2
            # vision replicated, text split: sharded weights halve, only norms (and vocab padding) repeat
            assert got["vision_params"] == full_vision
            assert 0.45 * full_text < got["text_params"] < 0.55 * full_text, (got["text_params"], full_text)
            assert got["heads"] == (2, 1)
            assert got["tied"] == tie
            if want_gen is not None:
                assert torch.equal(got["generate"][0], want_gen[0])
                assert torch.equal(got["generate"][1], res[0]["generate"][1])   # sampling agrees on ranks
        # every rank holds the full, identical logits
        assert torch.equal(res[0]["loaded"][1], res[1]["loaded"][1])


def test_serve_tensor_parallel_runner(saved, tmp_path):
    model_dir, ref = saved[True]
    want_tokens, want_logits, _ = greedy(ref)
    _run([sys.executable, __file__, "serve", str(model_dir), str(tmp_path / "serve.pt")])
    got = torch.load(tmp_path / "serve.pt")
    torch.testing.assert_close(got["logits"], want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["tokens"], want_tokens)
    torch.testing.assert_close(got["forward"], want_logits, rtol=1e-5, atol=1e-5)
    # A fresh process for the launcher probe: a second gloo group in the process that just tore one down
    # raced with that teardown (rank aborts, -6) on this 2-core machine.
    _run([sys.executable, __file__, "launch", str(model_dir), str(tmp_path / "launch.pt")])
    assert torch.load(tmp_path / "launch.pt") == [0, 1]


def test_sizes_that_do_not_divide_raise():
    cfg = tiny_config()   # intermediate_size 37, 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="intermediate_size=37"):
        check_tp_sizes(cfg.text_config, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_tp_sizes(_config().text_config, 4)
    check_tp_sizes(_config().text_config, 2)


def test_from_pretrained_rejects_bad_tp_size_before_spawning(saved, tmp_path):
    model_dir, _ = saved[True]
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        Qwen2VLForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto", tp_size=3)
    with pytest.raises(ValueError, match="tp_plan"):
        Qwen2VLForConditionalGeneration.from_pretrained(model_dir, tp_plan="colwise", tp_size=2)
    with pytest.raises(ValueError, match="torchrun"):
        Qwen2VLForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto", tp_size=2)


def test_tp_size_one_in_process(saved):
    """tp_size=1 without torchrun: a private 1-rank group; same results as the plain model."""
    import torch.distributed as dist

    model_dir, ref = saved[True]
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto", tp_size=1)
        assert model.tp_world_size == 1
        got, want = greedy(model), greedy(ref)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert env_before == {k: os.environ.get(k) for k in env_before}


# ----------------------------------------------------------------------------------------------- rank programs
def _torchrun_main(model_dirs: str, out: str) -> None:
    from qwen2vl.parallel import parallelize

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(1000 + rank)     # different RNG streams on purpose (see gen)
    for i, model_dir in enumerate(model_dirs.split(",")):
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto", tp_size=2,
                                                                dtype=torch.float32)
        attn = model.language_model.layers[0].self_attn
        tie = model.config.tie_word_embeddings
        res = {"loaded": greedy(model), "generate": gen(model, sample=True),
               "text_params": text_parameter_count(model),
               "vision_params": sum(p.numel() for p in model.model.visual.parameters()),
               "heads": (attn.num_heads, attn.num_kv_heads), "tied": model.lm_head.weight is
               model.get_input_embeddings().weight}
        assert tie == res["tied"]
        res["parallelized"] = greedy(parallelize(_model(tie), tp_size=2))
        torch.save(res, f"{out}{i}.rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()   # both ranks done before either tears the group down
    dist.destroy_process_group()
    # gloo's threads occasionally abort the interpreter's own teardown ("terminate called without an active
    # exception", after all results are written); nothing is left to clean up, so leave directly.
    sys.stdout.flush()
    os._exit(0)


def _launch_probe():
    import torch.distributed as dist

    from qwen2vl.parallel import init_distributed

    ctx = init_distributed(2)
    ranks = [None, None]
    dist.all_gather_object(ranks, ctx.rank)
    return ranks


def _serve_main(model_dir: str, out: str) -> None:
    from qwen2vl.parallel import serve_tensor_parallel

    torch.set_num_threads(1)

    def serve(runner):
        runner.seed(0)
        try:
            runner.run(_runner_greedy, _Unloadable())
            raise AssertionError("a command the worker cannot decode must raise on rank 0")
        except RuntimeError as e:
            assert "could not decode" in str(e)
        tokens, logits, _ = runner.run(_runner_greedy)
        forward = runner(**_inputs(), use_cache=False).logits     # tensors travel to the worker
        return {"tokens": tokens, "logits": logits, "forward": forward}

    res = serve_tensor_parallel(model_dir, 2, serve, num_threads=1, dtype=torch.float32)
    torch.save(res, out)


def _launch_main(model_dir: str, out: str) -> None:
    from qwen2vl.parallel import launch

    torch.save(launch(_launch_probe, 2, num_threads=1, timeout=120), out)


def _runner_greedy(model, *_):
    return greedy(model)


def _fail_on_load():
    raise RuntimeError("cannot be unpickled here")


class _Unloadable:
    """Pickles on rank 0, fails to unpickle on the worker (the runner must stay in lockstep)."""

    def __reduce__(self):
        return _fail_on_load, ()


if __name__ == "__main__":
    mode, model_dir, out = sys.argv[1:4]
    {"torchrun": _torchrun_main, "serve": _serve_main, "launch": _launch_main}[mode](model_dir, out)


def test_parallel_linears_refuse_features_that_do_not_split():
    from qwen2vl.parallel.layers import ColumnParallelLinear, RowParallelLinear

    with pytest.raises(ValueError, match="ColumnParallelLinear: 6 output features do not split over 4 ranks"):
        ColumnParallelLinear(8, 6, False, 0, 4)
    with pytest.raises(ValueError, match="RowParallelLinear: 6 input features do not split over 4 ranks"):
        RowParallelLinear(6, 8, False, 0, 4)
    assert ColumnParallelLinear(8, 12, False, 1, 4).out_features == 3
    assert RowParallelLinear(12, 8, False, 1, 4).in_features == 3
