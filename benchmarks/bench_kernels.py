"""CPU kernels vs torch on the same data (not a test): GEMV bandwidth for 1-8 activation rows over uncached
1536x8960 weights (bf16 and int8), one row against torch's read bandwidth (x.sum), and vision attention (fused
rotary + flash) vs torch SDPA.

    python benchmarks/bench_kernels.py            # best of 7, interleaved; GB/s of weight bytes read

The kernel columns force the kernels (QWEN2VL_BACKEND=kernels), whatever `choose` picked on this machine.
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen2vl.kernels import cpu, cpu_ops  # noqa: E402
from qwen2vl.model.vision import rotate_half, vision_rotary  # noqa: E402


def best(fn, n=7):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    torch.set_num_threads(2)
    os.environ["QWEN2VL_BACKEND"] = "kernels"  # cpu.linear / linear_int8 = the kernels (today's rule), not a choice
    if cpu.library() is None:
        print("CPU kernels unavailable here (no AVX2 / AVX512 or no C compiler): nothing to compare")
        return
    k, n, count = 1536, 8960, 24
    ws = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(count)]
    wq = [torch.randint(-127, 127, (n, k), dtype=torch.int8) for _ in range(count)]
    s = torch.rand(n, dtype=torch.bfloat16)
    size = count * n * k
    print(f"library build: {cpu.flavour()}")
    print("rows | torch bf16 | kernel bf16 | torch int8pack | kernel int8   (GB/s of weights read)")
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        a = best(lambda: [F.linear(x, w) for w in ws])
        b = best(lambda: [cpu.linear(x, w) for w in ws])
        c = best(lambda: [torch._weight_int8pack_mm(x, w, s) for w in wq])
        takes = cpu.linear_int8(x, wq[0], s) is not None  # the int8 kernel's row limit depends on the build
        d = best(lambda: [cpu.linear_int8(x, w, s) for w in wq]) if takes else float("nan")
        print(f"{rows:4d} | {2 * size / a / 1e9:10.1f} | {2 * size / b / 1e9:11.1f} | {size / c / 1e9:14.1f} | "
              f"{size / d / 1e9:12.1f}")
    # one activation row vs the machine's read bandwidth, interleaved (a shared VM's bandwidth drifts)
    big = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    for shape in ((8960, 1536), (1536, 8960), (1536, 1536)):
        wl = [torch.randn(*shape, dtype=torch.bfloat16) for _ in range(max(4, int(4e8 / (2 * shape[0] * shape[1]))))]
        v = torch.randn(1, shape[1], dtype=torch.bfloat16)
        t_sum = best(lambda: big.sum(), 3)
        t_gemv = best(lambda: [cpu.linear(v, w) for w in wl], 3)
        gb = 2 * len(wl) * shape[0] * shape[1]
        print(f"1 row, {shape[0]}x{shape[1]} weights: kernel {gb / t_gemv / 1e9:.1f} GB/s, "
              f"torch sum over 1 GiB {big.numel() * 4 / t_sum / 1e9:.1f} GB/s")
    del big
    if cpu.kernel("vision_attention") is None:
        print(f"vision attention: no kernel in the {cpu.flavour()} build (torch SDPA runs)")
        return
    heads, dim = 16, 80
    for length in (1024, 3996):
        qkv = torch.randn(length, 3 * heads * dim, dtype=torch.bfloat16)
        cos, sin = vision_rotary(torch.randint(0, 70, (length, 2)), dim)

        def reference():
            q, kk, v = qkv.view(length, 3, heads, dim).unbind(1)
            q = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(q.dtype)
            kk = (kk.float() * cos[:, None] + rotate_half(kk.float()) * sin[:, None]).to(kk.dtype)
            return F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), v.transpose(0, 1))

        t_ref = best(reference, 3)
        t_ker = best(lambda: cpu_ops.vision_attention(qkv, cos, sin, heads, dim ** -0.5, [0, length]), 3)
        print(f"vision attention, {length} tokens: torch (rotary + SDPA) {t_ref * 1e3:.0f} ms, "
              f"kernel {t_ker * 1e3:.0f} ms, {t_ref / t_ker:.2f}x")


if __name__ == "__main__":
    main()
