"""Cost of structured output (llguidance token masks) on decoding. Not a test.

1. End to end on the bundled demo model: decode tokens/s of `LLM.generate` at batch 1 and 8, every row
   constrained to a JSON schema (an array of 3-digit integers) vs. the same number of unconstrained tokens
   (ignore_eos, max_tokens = the constrained run's length). Prefill is included in both (short prompts). Also
   the share of the constrained run's wall time spent computing/applying masks (robust to a busy machine).
2. The same end to end on the real 2B shape (random bf16 weights, the real 151k tokenizer and chat template from
   ../shared): `--config 2b` (skipped by default: it builds a 4.4 GB checkpoint and takes minutes).
3. The mask step alone with Qwen2's real 151k vocabulary (tokenizer from ../shared/qwen2-vl when present):
   ms per decode step to compute the masks of a batch (llguidance's thread pool), expand them and apply them to
   (B, 151936) logits, walking a JSON answer token by token. Compare with the model's own step time.

    python benchmarks/bench_structured.py [--tokens 96] [--repeats 3] [--config demo|2b|both]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qwen2vl.engine import LLM, SamplingParams
from qwen2vl import guided_decoding as guided

PROMPT = [{"role": "user", "content": "List some numbers as JSON."}]
QWEN2_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "qwen2-vl" / "Qwen2-VL-2B-Instruct"


def schema_for(n_items: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999},
            "minItems": n_items, "maxItems": n_items}


def timed(llm: LLM, params: list[SamplingParams]) -> tuple[float, int]:
    t = time.perf_counter()
    outs = llm.chat([PROMPT] * len(params), params, use_tqdm=False)
    return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)


class MaskClock:
    """Wall time spent in the mask step (guided.mask_logits + guided.advance) while installed: a share of the
    run's time that, unlike a difference of two noisy rates, holds up on a busy machine."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = (guided.mask_logits, guided.advance)

    def _timed(self, fn):
        def run(*a):
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds += time.perf_counter() - t
        return run

    def __enter__(self):
        guided.mask_logits, guided.advance = (self._timed(f) for f in self.saved)
        return self

    def __exit__(self, *exc):
        guided.mask_logits, guided.advance = self.saved


def end_to_end(tokens: int, repeats: int, model: str = "qwen2vl-demo", label: str = "demo model",
               tokens_per_item: int = 3) -> None:
    llm = LLM(model, max_num_seqs=8, max_model_len=1024, dtype=None if model == "qwen2vl-demo" else "bfloat16")
    schema = schema_for(tokens // tokens_per_item)  # "123, " is about 3 tokens with the demo vocabulary
    for batch in (1, 8):
        guided_p = [SamplingParams(temperature=0, max_tokens=4 * tokens, json_schema=schema)] * batch
        timed(llm, guided_p)  # warm-up (tokenizer conversion, first grammar)
        n_tok = timed(llm, guided_p)[1] // batch
        free_p = [SamplingParams(temperature=0, max_tokens=n_tok, ignore_eos=True)] * batch
        rates = {"free": [], "schema": []}
        shares = []
        for _ in range(repeats):
            for name, p in (("free", free_p), ("schema", guided_p)):
                with MaskClock() as clock:
                    dt, n = timed(llm, p)
                rates[name].append(n / dt)
                if name == "schema":
                    shares.append(clock.seconds / dt)
        free, cons = statistics.median(rates["free"]), statistics.median(rates["schema"])
        print(f"{label}, batch {batch}, {n_tok} tokens/row: unconstrained {free:8.1f} tok/s, "
              f"JSON schema {cons:8.1f} tok/s ({100 * (free - cons) / free:+.1f} % slower); "
              f"mask step {100 * statistics.median(shares):.1f} % of the constrained run's time")


def mask_cost(repeats: int) -> None:
    if not (QWEN2_DIR / "vocab.json").is_file():
        print(f"(skipping the 151k-vocabulary mask timing: no tokenizer at {QWEN2_DIR})")
        return
    from qwen2vl.processing.tokenizer import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(QWEN2_DIR)
    vocab = 151936
    t = time.perf_counter()
    gt = guided.GuideTokenizer(tok, vocab, [tok.convert_tokens_to_ids("<|im_end|>")])
    print(f"Qwen2 vocabulary: llguidance tokenizer built in {time.perf_counter() - t:.2f} s (once per engine)")
    schema = {"type": "object", "properties": {"vendor": {"type": "string"}, "total": {"type": "number"},
                                               "items": {"type": "array", "items": {"type": "string"}}},
              "required": ["vendor", "total", "items"], "additionalProperties": False}
    answer = tok.encode('{"vendor": "ACME Corporation", "total": 1234.5, "items": ["paper", "ink", "stapler"]}')
    grammar = guided.compile_grammar(SamplingParams(json_schema=schema))
    for batch in (1, 8):
        per_step = []
        for _ in range(repeats):
            guides = [guided.Guide(gt, grammar) for _ in range(batch)]
            logits = torch.randn(batch, vocab)
            t = time.perf_counter()
            for token in answer:
                guided.mask_logits(logits, guides)
                guided.advance(guides, [token] * batch)
            per_step.append((time.perf_counter() - t) / len(answer))
        print(f"Qwen2 vocabulary, batch {batch}: mask + apply {1000 * statistics.median(per_step):.2f} ms per "
              f"decode step ({len(answer)} steps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per row (about)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default="demo", choices=["demo", "2b", "both"])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.config in ("demo", "both"):
        end_to_end(args.tokens, args.repeats)
    if args.config in ("2b", "both"):
        import tempfile

        from bench_multiturn import build_model  # the 2B shape with the real tokenizer files

        with tempfile.TemporaryDirectory() as tmp:
            build_model(Path(tmp), small=False)
            # Qwen2's BPE writes "123" as one token per digit ("1","2","3") plus ", " -> about 4 tokens an item
            end_to_end(args.tokens, args.repeats, tmp, "2B shape (random bf16 weights)", tokens_per_item=4)
    mask_cost(args.repeats)


if __name__ == "__main__":
    main()
