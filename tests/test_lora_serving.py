"""LoRA adapters served per request (issue #20): `qwen2vl serve --lora-modules name=DIR`, the engine's `add_lora` /
`lora=`. Each adapter's greedy answer equals `from_pretrained(..., adapter=DIR)` (the merged model); base-model
requests are unchanged; requests for different adapters run in one batch (per-row LoRA deltas); the prefix cache
never shares KV between adapters; unknown names are 404; a bad folder stops start-up with a clear error."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from qwen2vl.engine import LLMEngine, SamplingParams
from qwen2vl.model import Qwen2VLForConditionalGeneration
from serve_helpers import KEY, NAME, model_dir as _model_dir, parse, start
from test_engine import naive_greedy

peft = pytest.importorskip("peft")
PROMPT = {"prompt_token_ids": list(range(40, 75))}                 # 35 tokens: two prefix-cache blocks
OTHER = {"prompt_token_ids": list(range(90, 110))}
N = 8
model_dir = pytest.fixture(scope="module")(_model_dir)


def make_adapter(base_dir, out, seed: int, targets=None, rslora=False):
    """A PEFT adapter with random (non-zero) A and B, as training would leave it."""
    from qwen2vl.lora import apply_lora, lora_config

    cfg = lora_config(r=4, alpha=16, targets=targets)
    cfg.use_rslora = rslora
    model = apply_lora(Qwen2VLForConditionalGeneration.from_pretrained(base_dir), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_adapter(model_dir, d / "alpha", 1),
            "beta": make_adapter(model_dir, d / "beta", 2, targets=["q_proj", "v_proj", "down_proj"], rslora=True)}


@pytest.fixture(scope="module")
def want(model_dir, adapters):
    """Greedy references: the base model and each adapter merged by from_pretrained(adapter=DIR)."""
    out = {}
    for name, path in [(None, None), *adapters.items()]:
        m = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, adapter=path)
        out[name] = {k: naive_greedy(m, p, N) for k, p in (("p", PROMPT), ("o", OTHER))}
    assert len({tuple(v["p"]) for v in out.values()}) == 3   # the adapters do change the answers
    return out


def engine(model_dir, adapters, **kw):
    eng = LLMEngine(Qwen2VLForConditionalGeneration.from_pretrained(model_dir), max_num_seqs=8, max_model_len=256,
                    eos_token_ids=[], **kw)
    for name, path in adapters.items():
        eng.add_lora(name, path)
    return eng


def test_mixed_adapters_in_one_batch_equal_merged_models(model_dir, adapters, want):
    eng = engine(model_dir, adapters, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0, max_tokens=N)
    reqs = [(lora, key, eng.add_request(p, greedy, lora=lora))
            for key, p in (("p", PROMPT), ("o", OTHER)) for lora in (None, "alpha", "beta")]
    eng.run_until_done()
    assert eng.peak_running == 6                                       # all six decoded together
    for lora, key, req in reqs:
        assert req.seqs[0].output_ids == want[lora][key], (lora, key)


def test_prefix_cache_never_shares_kv_between_adapters(model_dir, adapters, want):
    eng = engine(model_dir, adapters)
    greedy = SamplingParams(temperature=0, max_tokens=N)
    order = ["alpha", None, "beta", "alpha"]
    outs = []
    for lora in order:
        req = eng.add_request(PROMPT, greedy, lora=lora)
        eng.run_until_done()
        outs.append((lora, req))
    assert [r.num_cached_tokens for _, r in outs[:3]] == [0, 0, 0]    # same tokens, other adapters: no sharing
    assert outs[3][1].num_cached_tokens >= 32                         # the same adapter again: shared
    for lora, req in outs:
        assert req.seqs[0].output_ids == want[lora]["p"], lora


def test_bad_adapters_are_clear_errors(model_dir, adapters, tmp_path):
    eng = engine(model_dir, {})
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        eng.add_lora("x", tmp_path)
    vision = tmp_path / "vision"
    from qwen2vl.lora import apply_lora
    apply_lora(Qwen2VLForConditionalGeneration.from_pretrained(model_dir), r=2, vision=True).save_pretrained(vision)
    with pytest.raises(ValueError, match="decoder's linears only"):
        eng.add_lora("v", vision)
    assert eng.lora_names == []                                       # nothing half-installed
    from qwen2vl.server import build_engine
    with pytest.raises(ValueError, match=r"--lora-modules bad=.*no adapter_config.json"):
        build_engine(parse(model_dir, "--lora-modules", f"bad={tmp_path / 'missing'}"))
    from qwen2vl.server.startup import main
    with pytest.raises(SystemExit, match=r"--lora-modules v=.*decoder's linears only"):  # `qwen2vl serve` stops
        main(["--model", str(model_dir), "--lora-modules", f"v={vision}", "--port", "0"])
    with pytest.raises(SystemExit, match="expected name=path"):
        main(["--model", str(model_dir), "--lora-modules", "just-a-path"])


def test_server_selects_adapters_by_model_name(model_dir, adapters, want):
    from qwen2vl.engine.model_setup import load_processor

    msgs = [{"role": "user", "content": "Say something."}]
    srv, eng = start(model_dir, "--lora-modules", f"alpha={adapters['alpha']}",
                     json.dumps({"name": "beta", "path": str(adapters["beta"])}))
    h = {"Authorization": f"Bearer {KEY}"}
    try:
        models = httpx.get(srv.url + "/v1/models", headers=h).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [(NAME, None), ("alpha", NAME), ("beta", NAME)]

        def ask(model):
            r = httpx.post(srv.url + "/v1/chat/completions", headers=h, timeout=60, json={
                "model": model, "messages": msgs, "max_tokens": N, "temperature": 0})
            return r

        got = {m: ask(m).json() for m in (NAME, "alpha", "beta")}
        assert [got[m]["model"] for m in got] == [NAME, "alpha", "beta"]
        miss = ask("gamma")
        assert miss.status_code == 404 and miss.json()["error"]["message"] == "The model `gamma` does not exist."
        assert ask(str(adapters["alpha"])).status_code == 404           # a path is not a model name
    finally:
        srv.stop()
        eng.shutdown()
    proc = load_processor(str(model_dir))
    ids = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")["input_ids"][0].tolist()
    for model, lora in ((NAME, None), ("alpha", "alpha"), ("beta", "beta")):
        m = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, adapter=adapters.get(lora))
        text = proc.tokenizer.decode(naive_greedy(m, {"prompt_token_ids": ids}, N), skip_special_tokens=True)
        assert got[model]["choices"][0]["message"]["content"] == text, model
