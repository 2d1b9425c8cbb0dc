"""OpenMP fork/joins per decoded token (not a test, not a timing): how many parallel regions one CPU decoding step
opens, counted by a GOMP_parallel shim under LD_PRELOAD (the kernels and torch share the GNU OpenMP runtime).

    python benchmarks/bench_omp_forks.py [--layers 28] [--rows 1]

Prints the regions with a team of 2+ threads (real fork/joins: each waits for every thread, so a thread another
process has descheduled stalls the step) and the serialized ones (`if (...)` false: no fork). A random bf16 model
with the 2B's layer count and small widths: the count depends on the layers and on which kernels fork at decode
sizes, not on the widths. Measured 2026-12-06 (fused step, batch 1, 2 threads): 141 per token = 28 layers x 5
(q/k/v group, attention, o, gate/up + SiLU, down) + the LM head, 113 more serialized (norms, rotary), when each
kernel opened its own region; 2 (the step's one region + the LM head) and 1 serialized since the bf16 step is one
region (cpu_layer.c; its 5 barriers per layer are not counted here)."""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long teams = 0, serial = 0;
typedef void (*par_fn)(void (*)(void *), void *, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags) {
    static par_fn real = 0;
    if (!real) real = (par_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
    __atomic_add_fetch(n == 1 ? &serial : &teams, 1, __ATOMIC_RELAXED);
    real(fn, data, n, flags);
}
long omp_teams(void) { return teams; }
long omp_serial(void) { return serial; }
"""


def measure(layers: int, rows: int, steps: int = 10) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny_config

    from qwen2vl import Qwen2VLForConditionalGeneration
    from qwen2vl.kernels import cpu_ops
    from qwen2vl.model.cache import KVCache

    shim = ctypes.CDLL(None)
    teams, serial = shim.omp_teams, shim.omp_serial
    teams.restype = serial.restype = ctypes.c_long
    torch.set_num_threads(2)
    cfg = tiny_config(mrope_section=(16, 8, 8), layers=layers, intermediate=512)  # H 256, head_dim 64, 4 / 2 heads
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    fused = []
    real = cpu_ops.decode_layers
    cpu_ops.decode_layers = lambda *a: fused.append(real(*a)) or fused[-1]
    ids = torch.arange(7, 23).repeat(rows, 1)  # no vision placeholder ids
    with torch.inference_mode():
        cache = KVCache.from_config(cfg.text_config, rows, 16 + steps + 2, torch.bfloat16, "cpu")
        tok = model(input_ids=ids, past_key_values=cache).logits[:, -1].argmax(-1)[:, None]
        t0, s0 = teams(), serial()
        for _ in range(steps):
            tok = model.decode_step(tok, cache)[0].argmax(-1)[:, None]
    print(f"{layers} layers, {rows} row(s), fused step ran {sum(fused)}/{len(fused)}: "
          f"{(teams() - t0) / steps:.1f} fork/joins per token, {(serial() - s0) / steps:.1f} serialized regions")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rows", type=int, default=1)
    args = p.parse_args()
    if os.environ.get("QWEN2VL_OMP_SHIM"):
        return measure(args.layers, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        src.write_text(SHIM)
        subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"],
                       check=True)
        env = dict(os.environ, LD_PRELOAD=str(lib), QWEN2VL_OMP_SHIM="1")
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)


if __name__ == "__main__":
    main()
