"""Planted-bug (mutation) run: does the test suite catch each of a list of deliberate bugs?

Each mutant is a text patch (every occurrence of `old` in `file` becomes `new`) applied to a temporary copy of
the working tree (git's tracked + untracked, non-ignored files), never to the tree itself; the copy is restored
after each mutant. For each, the relevant tests (a small targeted subset) run in the copy; the mutant is CAUGHT
when they fail, SURVIVED when they pass, ERROR when pytest itself errored (exit code >= 2: the patch broke
collection, which proves nothing). Not part of CI. Kernels are built into a private cache (QWEN2VL_CACHE).

    python tools/mutants.py              # all mutants, then the table
    python tools/mutants.py --list       # names only
    python tools/mutants.py --only rope-text-hw,engine-rep-inverted
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)


M = Mutant
SERVER_TUPLE = '("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",'
MUTANTS = [
    # ---- the planted bugs
    M("rope-text-hw", "rope", "qwen2vl/model/text.py", "torch.full((n,), i % 3,", "torch.full((n,), (0, 2, 1)[i % 3],",
      ("tests/test_model_parity.py", "-k", "forward_and_loss")),
    M("rope-vision-hw", "rope", "qwen2vl/model/vision.py", "torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)",
      "torch.cat([freqs[:, 1], freqs[:, 0]], dim=-1)", ("tests/test_model_parity.py", "-k", "forward_and_loss")),
    M("rope-text-hw (real heads)", "rope", "qwen2vl/model/text.py", "torch.full((n,), i % 3,",
      "torch.full((n,), (0, 2, 1)[i % 3],", ("tests/test_model_parity_real_heads.py",)),
    M("rope-vision-hw (real heads)", "rope", "qwen2vl/model/vision.py",
      "torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)", "torch.cat([freqs[:, 1], freqs[:, 0]], dim=-1)",
      ("tests/test_model_parity_real_heads.py", "-k", "vision_tower")),
    M("engine-rep-inverted", "sampling", "qwen2vl/engine/sampler.py",
      "apply_repetition_penalty(row, seen, p.repetition_penalty)",
      "apply_repetition_penalty(row, seen, 1.0 / p.repetition_penalty)", ("tests/test_sampling_e2e.py",)),
    M("engine-freq-sign", "sampling", "qwen2vl/engine/sampler.py", "row - (p.frequency_penalty * counts",
      "row - (-p.frequency_penalty * counts", ("tests/test_sampling_e2e.py",)),
    *[M(f"server-drops-{name}", "server", "qwen2vl/server/serving.py", SERVER_TUPLE,
        SERVER_TUPLE.replace(f' "{name}",', ""), ("tests/test_server_sampling.py", "-k", "reaches"))
      for name in ("top_p", "top_k", "min_p", "repetition_penalty")],
    M("int8-negated", "quantization", "qwen2vl/quantization/int8.py", "torch.round(w32 / scales[:, None])",
      "torch.round(-w32 / scales[:, None])", ("tests/test_quantization.py", "-k", "logit_error")),
    M("int8-halved", "quantization", "qwen2vl/quantization/int8.py", "q.scales.copy_(scales.to(w.dtype))",
      "q.scales.copy_((scales / 2).to(w.dtype))", ("tests/test_quantization.py", "-k", "logit_error")),
    M("int8-layers-negated", "quantization", "qwen2vl/quantization/model.py",
      "setattr(parent, name, convert(child))",
      "setattr(parent, name, convert(child)); getattr(parent, name).weight_int8.neg_()",
      ("tests/test_quantization.py", "-k", "logit_error")),
    M("int8-layers-halved", "quantization", "qwen2vl/quantization/model.py",
      "setattr(parent, name, convert(child))",
      "setattr(parent, name, convert(child)); getattr(parent, name).scales.mul_(0.5)",
      ("tests/test_quantization.py", "-k", "logit_error")),
    M("int4-nibbles-swapped", "quantization", "qwen2vl/quantization/int4.py",
      "lo, hi = b[:, :, 0] | (b[:, :, 1] << 4)", "lo, hi = b[:, :, 1] | (b[:, :, 0] << 4)",
      ("tests/test_int4_kernels.py",)),
    M("int4-kernel-zero-point", "quantization", "qwen2vl/kernels/cpu_int4.c", "(float)(z[i] + 128)",
      "(float)(z[i] + 127)", ("tests/test_int4_kernels.py", "-k", "kernel_matches")),
    # ---- processing
    M("video-indices-linspace", "processing", "qwen2vl/processing/video_processing.py",
      "return torch.arange(0, total, total / n).int().tolist()",
      "return torch.linspace(0, total - 1, n).int().tolist()", ("tests/test_video_oracle.py",)),
    M("smart-resize-round-down", "processing", "qwen2vl/processing/image_processing.py",
      "h_bar = max(factor, math.floor(height / beta / factor) * factor)",
      "h_bar = max(factor, round(height / beta / factor) * factor)",
      ("tests/test_video_oracle.py", "tests/test_image_processing.py")),
    M("video-pad-first-frame", "processing", "qwen2vl/processing/patchify.py",
      "np.repeat(a[-1:], pad, 0) if use_np else a[-1:].expand(pad, -1, -1, -1)",
      "np.repeat(a[:1], pad, 0) if use_np else a[:1].expand(pad, -1, -1, -1)",
      ("tests/test_video_oracle.py", "-k", "float")),
    M("video-pad-first-frame (uint8 path)", "processing", "qwen2vl/processing/patchify.py",
      "ids = [min(i, f - 1) for i in range(g * t, (g + 1) * t)]",
      "ids = [i if i < f else 0 for i in range(g * t, (g + 1) * t)]", ("tests/test_video_oracle.py",)),
    # ---- rope / positions
    M("rope-after-vision-plus-2", "rope", "qwen2vl/model/rope_index.py", "cur = int(block.max()) + 1",
      "cur = int(block.max()) + 2", ("tests/test_rope_index.py", "tests/test_model_parity_real_heads.py")),
    M("vision-pos-merge-order", "rope", "qwen2vl/model/rope_index.py", "hh = hh.permute(0, 2, 1, 3).reshape(-1)",
      "hh = hh.permute(0, 1, 2, 3).reshape(-1)", ("tests/test_model_parity_real_heads.py", "-k", "vision_tower")),
    # ---- attention
    M("vision-one-segment-per-video", "attention", "qwen2vl/model/rope_index.py",
      "lens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])",
      "lens = grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]", ("tests/test_model_parity_real_heads.py",)),
    M("eager-attention-scale", "attention", "qwen2vl/model/attention.py",
      "scores = torch.matmul(q, k.transpose(2, 3)) * scale", "scores = torch.matmul(q, k.transpose(2, 3)) * scale * 0.9",
      ("tests/test_model_parity.py", "-k", "backends_agree")),
    # ---- cache
    M("cache-real-lengths-ignore-pads", "cache", "qwen2vl/model/cache.py",
      "self.real_lengths[b] += num_new if new_real is None else new_real[b]", "self.real_lengths[b] += num_new",
      ("tests/test_model_parity.py", "-k", "incremental")),
    M("cache-ragged-write-at-max", "cache", "qwen2vl/model/cache.py",
      "pos = torch.tensor(self.lengths, device=key.device)[:, None] + torch.arange(s, device=key.device)",
      "pos = torch.full((b, 1), max(self.lengths), device=key.device) + torch.arange(s, device=key.device)",
      ("tests/test_engine.py", "-k", "ragged")),
    # ---- sampling
    M("top-k-drops-kth", "sampling", "qwen2vl/generation/logits.py", "scores.masked_fill(scores < kth, NEG_INF)",
      "scores.masked_fill(scores <= kth, NEG_INF)", ("tests/test_sampling_e2e.py",)),
    M("temperature-multiplies", "sampling", "qwen2vl/generation/logits.py", "return scores / temperature",
      "return scores * temperature", ("tests/test_sampling_e2e.py",)),
    M("engine-min-tokens-one-short", "sampling", "qwen2vl/engine/sampler.py", "if len(seq.output_ids) < p.min_tokens:",
      "if len(seq.output_ids) < p.min_tokens - 1:", ("tests/test_sampling_e2e.py",)),
    M("engine-presence-ignored", "sampling", "qwen2vl/engine/sampler.py", "p.presence_penalty * (counts > 0)",
      "0 * p.presence_penalty * (counts > 0)", ("tests/test_sampling_e2e.py",)),
    M("engine-seed-ignored", "sampling", "qwen2vl/engine/sequence.py", "torch.Generator().manual_seed(params.seed)",
      "torch.Generator().manual_seed(0)", ("tests/test_sampling_e2e.py", "-k", "seed")),
    # ---- server
    M("server-max-tokens-wins", "server", "qwen2vl/server/serving.py",
      "max_tokens=req.max_completion_tokens or req.max_tokens", "max_tokens=req.max_tokens or req.max_completion_tokens",
      ("tests/test_server_sampling.py", "-k", "lengths")),
    M("server-drops-stop-token-ids", "server", "qwen2vl/server/serving.py", "stop_token_ids=req.stop_token_ids,",
      "stop_token_ids=None,", ("tests/test_server_sampling.py", "-k", "lengths")),
    M("server-drops-min-tokens", "server", "qwen2vl/server/serving.py", "min_tokens=req.min_tokens,",
      "min_tokens=0,", ("tests/test_server_sampling.py", "-k", "lengths")),
    M("server-drops-seed", "server", "qwen2vl/server/serving.py", '"frequency_penalty", "seed"):',
      '"frequency_penalty"):', ("tests/test_server_sampling.py", "-k", "seed")),
    M("engine-stop-strings-ignored", "server", "qwen2vl/engine/sequence.py",
      "hit = self.detok.add(token, check_stop=n >= p.min_tokens)", "hit = self.detok.add(token, check_stop=False)",
      ("tests/test_server_sampling.py", "-k", "stop_string")),
    # ---- caches and chunked prefill (issue #23), the chat page (issue #24)
    M("prefix-cache-keyed-on-placeholders", "cache", "qwen2vl/engine/prefix_cache.py",
      "keys[i] = (hashes[item], k)", "keys[i] = (tok, k)", ("tests/test_prefix_cache.py", "-k", "never_share")),
    M("prefix-cache-restores-one-token-too-many", "cache", "qwen2vl/engine/prefix_cache.py",
      "matched = min(matched, limit)", "matched = min(matched + 1, limit)", ("tests/test_prefix_cache.py",)),
    M("vision-cache-shared-by-position", "cache", "qwen2vl/engine/vision_cache.py",
      "out.append(h_.hexdigest())", "out.append(str(len(out)))",
      ("tests/test_prefix_cache.py", "-k", "never_share or max_pixels")),
    M("chunked-prefill-positions-from-chunk", "cache", "qwen2vl/engine/runner.py",
      "position_ids=pos[:, :, start:end]", "position_ids=pos[:, :, :end - start]",
      ("tests/test_prefix_cache.py", "-k", "chunked")),
    M("web-ui-drops-history", "server", "qwen2vl/server/static/chat.js",
      "streamCompletion([...state.history, turn]", "streamCompletion([turn]",
      ("tests/test_web_ui.py", "-k", "second_turn")),
    # ---- tensor parallelism
    M("tp-row-parallel-no-all-reduce", "tp", "qwen2vl/parallel/layers.py",
      "out = all_reduce_sum(F.linear(x, self.weight), self.tp_group)", "out = F.linear(x, self.weight)",
      ("tests/test_tensor_parallel.py", "-k", "torchrun")),
    # ---- CPU kernels
    M("kernel-int8-scale-halved", "kernels", "qwen2vl/kernels/cpu_gemv.c", "scale ? scale[n] : 1.0f",
      "scale ? 0.5f * scale[n] : 1.0f", ("tests/test_kernels.py", "-k", "int8")),
    M("kernel-decode-attention-scale", "kernels", "qwen2vl/kernels/cpu_decode.c",
      "_mm512_reduce_add_ps(acc[r]) * scale;", "_mm512_reduce_add_ps(acc[r]) * scale * 1.25f;",
      ("tests/test_kernels.py", "-k", "decode_attention")),
    M("kernel-vision-attention-scale", "kernels", "qwen2vl/kernels/cpu_attention.c",
      "_mm512_mul_ps(s[i][c], _mm512_set1_ps(scale))", "_mm512_mul_ps(s[i][c], _mm512_set1_ps(1.1f * scale))",
      ("tests/test_kernels.py", "-k", "vision_attention_kernel")),
]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_mutant(m: Mutant, tree: Path, env: dict, timeout: int) -> tuple[str, float, str]:
    path = tree / m.file
    original = path.read_text()
    if m.old not in original:
        return "BAD PATCH", 0.0, f"text not found in {m.file}"
    path.write_text(original.replace(m.old, m.new))
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired:
        code, out = -1, "timeout"
    finally:
        path.write_text(original)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    status = {0: "SURVIVED", 1: "caught"}.get(code, "ERROR")
    return status, time.monotonic() - start, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    ap.add_argument("--baseline", action="store_true", help="first check every selection passes unmutated")
    args = ap.parse_args()
    chosen = MUTANTS if not args.only else [m for m in MUTANTS if m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.area:12s} {m.file}")
        return 0
    with tempfile.TemporaryDirectory(prefix="qwen2vl-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        env = dict(os.environ, PYTHONPATH=str(tree), QWEN2VL_CACHE=str(Path(tmp) / "cache"))
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                status, secs, last = run_mutant(Mutant("baseline", "", chosen[0].file, "", "", tests), tree, env,
                                                args.timeout)
                print(f"baseline {'ok' if status == 'SURVIVED' else 'FAILED'} {' '.join(tests)}: {last}", flush=True)
        rows = []
        for m in chosen:
            status, secs, last = run_mutant(m, tree, env, args.timeout)
            rows.append((m, status, secs, last))
            print(f"{status:9s} {m.name:34s} {secs:6.1f}s  {last}", flush=True)
    print(f"\n{'mutant':34s} {'area':12s} {'result':9s} tests")
    for m, status, secs, _ in rows:
        print(f"{m.name:34s} {m.area:12s} {status:9s} {' '.join(m.tests)}")
    survived = [m.name for m, s, _, _ in rows if s != "caught"]
    print(f"\n{len(rows) - len(survived)}/{len(rows)} caught" + (f"; not caught: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
