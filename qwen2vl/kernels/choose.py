"""Which implementation runs each CPU op: chosen by measurement once per machine, in this one place.

A setting that wins on one CPU kind loses on another (the C kernels beat torch's bf16 GEMV everywhere we measured,
but lose to oneDNN's AMX products and attention on Intel Sapphire Rapids), so for every op and shape class the
model runs, the call site hands `decide` its candidates and the first call times them on this machine (interleaved,
best of a few runs, within BUDGET_S seconds per process for all decisions together), keeps the fastest whose
result is exact enough (within TOLERANCE of an fp32 reference, relative to its largest value), logs one line and
records the choice on disk (`<kernel cache>/choices.json`, per CPU model + torch version + thread count + library
build), so a later load reads it instead of timing again.

Ops and their candidates (the call sites build them; "kernel" always also names today's default rule, the per-op
heuristics in cpu.py / cpu_ops.py that tests/test_kernels.py pins):

    vision_linear      onednn (prepacked weight) | torch (F.linear) | widened (fp32 on widened operands)
    vision_attention   kernel (fused rotary + flash) | torch (bf16 SDPA) | torch_fp32 (SDPA on fp32 operands)
    prefill_linear     chunked (GEMV kernel over 8-row chunks, < 64 rows) | widened | torch      (9+ rows)
    prefill_attention  kernel | torch (SDPA)
    decode_gemv        kernel | torch                           (1-8 rows)
    lm_head            kernel | torch                           (1-8 rows, a vocabulary-sized output)
    decode_attention   kernel | torch (SDPA)
    int8_gemv          kernel | torch (torch._weight_int8pack_mm) | intdot   (1-8 rows)
    int4_gemv          kernel | torch (torch._weight_int4pack_mm_for_cpu) | intdot   (1-8 rows, group-wise 4-bit)

"intdot" (cpu_intdot.c) quantizes the activations to int8 (blocks of 32 / 128 columns) and runs integer dot
products: off by <= 1/254 of each block's largest |x| per activation, well inside TOLERANCE on the trial's random
activations (~0.6 % of the largest output measured), so it competes on speed; "kernel" stays the exact path
(QWEN2VL_BACKEND=kernels or int4_gemv=kernel forces it). Records are keyed by the candidate lists too
(`machine_key`), so adding a candidate times the ops again.

`decide` returns a candidate's name, or None for today's default rule: where the choice is forced to "kernel", the
shapes are too small to be worth timing (every test model: bit-identical to before), the budget is spent (timed by
a later load), or no candidate is exact enough. QWEN2VL_BACKEND forces choices: "kernels" (today's rules
everywhere), "torch" (torch's own op everywhere), or per op "vision_linear=torch,decode_gemv=kernel"; a bare word
sets every op and later items override ("torch,decode_gemv=kernel"). "auto" or unset: measured.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..settings import settings
from .build import cache_dir, flavour, library

log = logging.getLogger(__name__)

OPS: dict[str, tuple[str, ...]] = {
    "vision_linear": ("onednn", "torch", "widened"),
    "vision_attention": ("kernel", "torch", "torch_fp32"),
    "prefill_linear": ("chunked", "widened", "torch"),
    "prefill_attention": ("kernel", "torch"),
    "decode_gemv": ("kernel", "torch"),
    "lm_head": ("kernel", "torch"),
    "decode_attention": ("kernel", "torch"),
    "int8_gemv": ("kernel", "torch", "intdot"),
    "int4_gemv": ("kernel", "torch", "intdot"),
}
BUDGET_S = 2.0           # timing per process, all decisions together (the rest are timed by a later load)
DECISION_CAP_S = 0.4     # one decision stops after this once every candidate ran twice
ROUNDS = (2, 25)         # timed runs per candidate: at least, at most (the best one counts)
STEADY = 1.25           # a candidate's two best runs further apart than this: the machine was busy, nothing recorded
MARGIN = 1.15            # another candidate replaces today's rule only when this much faster (timing noise on a
                         # shared machine must not flip a choice that is then kept on disk)
TOLERANCE = 2.0 ** -6    # max |y - fp32 reference| / max |reference|: bf16 rounding passes, a wrong result fails
MIN_WEIGHT = 1 << 20     # linears with fewer weight elements are not timed (tiny models: today's rule)
MIN_INT_WEIGHT = 1 << 18  # int8 / int4 linears: k / v of the 2B (256 x 1536) are timed too, so that all seven
                          # projections can be on kernels the fused decoding step has (int8: intdot only)
MIN_WIDTH = 1024         # attention with heads x head_dim below this is not timed
LM_HEAD_MIN_N = 32768    # a few-row product with at least this many outputs is the LM head

ENV = "QWEN2VL_BACKEND"
BUDGET_ENV = "QWEN2VL_CHOOSE_BUDGET"  # seconds, instead of BUDGET_S (benchmarks: every decision in their warm-ups)


def budget() -> float:
    value = settings().choose_budget
    if not value:
        return BUDGET_S
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={value!r} is not a number of seconds") from None


class Trial(NamedTuple):
    """What `decide` times: candidate name -> zero-argument call (returning None where it cannot run), the fp32
    reference, `view`, the part of a candidate's output that the reference covers (as fp32), and `today`, the
    candidates today's rule would run, in its order of preference (the first that runs is kept unless another is
    MARGIN times faster)."""
    candidates: dict[str, Callable[[], torch.Tensor | None]]
    reference: Callable[[], torch.Tensor]
    view: Callable[[torch.Tensor], torch.Tensor] = lambda y: y.float()
    today: tuple[str, ...] = ("kernel",)


class Decision(NamedTuple):
    choice: str | None   # None: today's default rule
    source: str          # forced | cached | measured | untimed | budget | inexact | unsteady
    times_ms: dict[str, float]


_lock = threading.RLock()
_memo: dict[tuple[str, tuple], Decision] = {}
_spent = 0.0
_measured = 0            # decisions timed in this process (tests check a second load times nothing)


def reset() -> None:
    """Forget this process's decisions and spent budget (tests changing QWEN2VL_BACKEND or the cache dir)."""
    global _spent, _measured
    with _lock:
        _memo.clear()
        _spent, _measured = 0.0, 0


def forced() -> dict[str, str]:
    """QWEN2VL_BACKEND parsed: op -> forced candidate ("kernel" = today's rule). ValueError naming a bad item."""
    spec = settings().backend
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            word = {"kernels": "kernel"}.get(item, item)
            if word == "auto":
                out.clear()
            elif word in ("kernel", "torch"):
                out.update({op: word for op in OPS})
            else:
                raise ValueError(f"{ENV}={spec!r}: {item!r} is not one of auto, kernels, torch or op=choice")
            continue
        op, choice = (s.strip() for s in item.split("=", 1))
        choice = {"kernels": "kernel"}.get(choice, choice)
        if op not in OPS:
            raise ValueError(f"{ENV}={spec!r}: unknown op {op!r}; ops are {', '.join(OPS)}")
        if choice not in OPS[op] + ("kernel", "auto"):
            raise ValueError(f"{ENV}={spec!r}: {op} takes one of {', '.join(sorted(set(OPS[op] + ('kernel',))))}")
        if choice == "auto":
            out.pop(op, None)
        else:
            out[op] = choice
    return out


def rows_class(op: str, rows: int) -> int:
    """The representative row count of the class `rows` falls in (what is timed; part of the key)."""
    if op in ("decode_gemv", "lm_head", "int8_gemv", "int4_gemv", "decode_attention"):
        return rows
    if op == "prefill_linear" and rows < 64:
        return 32
    if op == "vision_attention":
        return 512
    return 128 if rows < 512 else 256


def linear_op(rows: int, n: int) -> str:
    return ("lm_head" if n >= LM_HEAD_MIN_N else "decode_gemv") if rows <= 8 else "prefill_linear"


def decide(op: str, key: tuple, build: Callable[[], Trial], timed: bool = True) -> str | None:
    """The candidate to run for `op` at shape class `key` (ints), or None for today's default rule; decided once
    per process (then a dict lookup), timed once per machine. `build` makes the Trial (only when timing);
    `timed` False: too small to be worth timing."""
    d = _memo.get((op, key))
    if d is None:
        with _lock:
            d = _memo.get((op, key))
            if d is None:
                d = _memo[(op, key)] = _decide(op, key, build, timed)
    return d.choice


def _decide(op: str, key: tuple, build: Callable[[], Trial], timed: bool) -> Decision:
    global _spent, _measured
    f = forced().get(op)
    if f is not None:
        return Decision(None if f == "kernel" else f, "forced", {})
    if not timed:
        return Decision(None, "untimed", {})
    name = f"{op}|{','.join(map(str, key))}"
    cached = _read_disk().get(name)
    if cached in OPS[op]:
        return Decision(cached, "cached", {})
    if _spent >= budget():
        return Decision(None, "budget", {})
    t0 = time.perf_counter()
    with torch.no_grad():  # not inference_mode: what a candidate caches (a packed weight, a buffer) must stay usable
        trial = build()
        times, rejected = _measure(trial)
    _spent += time.perf_counter() - t0
    _measured += 1
    if not times:
        log.warning("qwen2vl kernels: %s %s: no candidate exact enough (%s); today's rule", op, key, rejected)
        return Decision(None, "inexact", {})
    best = min(times, key=lambda n: times[n][0])
    today = next((n for n in trial.today if n in times), None)
    if today is not None and times[today][0] <= MARGIN * times[best][0]:
        best = today
    if any(len(times[n]) > 1 and times[n][1] > STEADY * times[n][0] for n in {best, today} - {None}):
        # the two best runs disagree: a busy machine; keep today's rule and time again on a later load
        log.info("qwen2vl kernels: %s %s: timings unsteady (%s); today's rule", op, key, _fmt(times))
        return Decision(None, "unsteady", {n: t[0] for n, t in times.items()})
    _write_disk(name, best)
    log.info("qwen2vl kernels: %s %s -> %s (%s%s)", op, key, best,
             _fmt(times), f"; inexact: {rejected}" if rejected else "")
    return Decision(best, "measured", {n: t[0] for n, t in times.items()})


def _fmt(times: dict[str, list[float]]) -> str:
    return ", ".join(f"{n} {t[0]:.3f} ms" for n, t in times.items())


def _measure(trial: Trial) -> tuple[dict[str, list[float]], list[str]]:
    """Each candidate once (its result checked against the reference), then interleaved timed runs: ROUNDS[0] to
    ROUNDS[1] each, stopping after DECISION_CAP_S or the rest of the budget. Returns each exact candidate's two
    best times (ms, ascending)."""
    ref = trial.reference().float()
    scale = float(ref.abs().max()) or 1.0
    runs, rejected = {}, []
    for name, fn in trial.candidates.items():
        try:
            y = fn()
        except (RuntimeError, ValueError) as exc:  # a candidate that cannot run here is no candidate
            rejected.append(f"{name}: {exc}"[:120])
            continue
        if y is None:
            continue
        err = float((trial.view(y) - ref).abs().max())
        if math.isfinite(err) and err <= TOLERANCE * scale:
            runs[name] = (fn, [])
        else:
            rejected.append(f"{name} (error {err:.3g} of {scale:.3g})")
    if len(runs) < 2:  # nothing to compare
        return {n: [0.0] for n in runs}, rejected
    t0 = time.perf_counter()
    cap = min(DECISION_CAP_S, max(budget() - _spent, 0.0))
    for r in range(ROUNDS[1]):
        for fn, ts in runs.values():
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        if r + 1 >= ROUNDS[0] and time.perf_counter() - t0 > cap:
            break
    return {n: sorted(1e3 * t for t in ts)[:2] for n, (fn, ts) in runs.items()}, rejected


# ------------------------------------------------------------------------------------------ on disk
def cpu_description() -> dict[str, str]:
    """vendor, model and the flags that decide kernels (AVX2 / AVX512 / BF16 / VNNI / AMX) of this CPU."""
    info = {"vendor": platform.machine(), "model": platform.processor() or platform.machine(), "flags": ""}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        k, _, v = (s.strip() for s in line.partition(":"))
        if k == "vendor_id":
            info["vendor"] = v
        elif k == "model name":
            info["model"] = v
        elif k == "flags":
            wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
                      "amx_int8")
            info["flags"] = " ".join(f for f in wanted if f in v.split())
            break
    return info


def machine_key() -> str:
    c = cpu_description()
    lib = flavour() if library() is not None else "none"
    cands = hashlib.sha256(repr(sorted(OPS.items())).encode()).hexdigest()[:8]  # a new candidate: time again
    return f"{c['vendor']} {c['model']} [{c['flags']}] | torch {torch.__version__} | " \
           f"{torch.get_num_threads()} threads | kernels {lib} | candidates {cands}"


def choices_path() -> Path:
    return cache_dir() / "choices.json"


def _read_all() -> dict:
    try:
        data = json.loads(choices_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_disk() -> dict[str, str]:
    return _read_all().get(machine_key(), {})


def _write_disk(name: str, choice: str) -> None:
    """Add one choice (read-modify-write, replaced atomically: a concurrent writer may drop an entry, which a
    later load then times again)."""
    path = choices_path()
    data = _read_all()
    data.setdefault(machine_key(), {})[name] = choice
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs timing again next load
        log.warning("qwen2vl kernels: could not record choices in %s (%s)", path, exc)


TODAY = "today's rule"


def summary() -> dict[str, str]:
    """op -> its decisions in this process, grouped: 'choice (source): shape keys' (for benchmark tables)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for (op, key), d in sorted(_memo.items()):
        label = f"{d.choice or TODAY} ({d.source})"
        groups.setdefault(op, {}).setdefault(label, []).append("x".join(map(str, key)))
    return {op: "; ".join(f"{label} {', '.join(keys) if len(keys) <= 6 else f'{len(keys)} shapes'}"
                          for label, keys in labels.items()) for op, labels in groups.items()}
