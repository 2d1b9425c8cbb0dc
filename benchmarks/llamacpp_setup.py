"""llama.cpp for bench_llamacpp.py: built, and fed the same random-weight checkpoint as qwen2vl, once per machine.

Everything lives in a cache outside the clone (QWEN2VL_BENCH_CACHE, default ~/.cache/qwen2vl-bench/llamacpp) and
every step is skipped when its output is already there, so only the first run pays (~10 min of build on 2 cores,
~5 min of checkpoint + conversion):
1. the `llama-cpp-python` sdist (PyPI, its ordinary client) whose vendored llama.cpp is built with cmake
   (-march=native; on AMX CPUs after a one-line fix of GCC 12 dropping the AMX tile config, see AMX_FIX);
2. the real Qwen2-VL-2B shape with random weights (seed 0), written by qwen2vl's own save_pretrained;
3. a venv with llama.cpp's converter requirements (transformers 4.57.6, its gguf-py, this project's torch), which
   turns that checkpoint into a BF16 text GGUF (+ Q8_0 / Q4_0 by llama-quantize) and an f16 mmproj GGUF;
4. a 1024x768 random-noise PNG (speed only: the weights are random).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_VERSION = "0.3.36"  # vendors llama.cpp 0c1e570 (ggml 0.25.3)
CACHE = Path(os.environ.get("QWEN2VL_BENCH_CACHE", Path.home() / ".cache/qwen2vl-bench")) / "llamacpp"
TARGETS = ("llama-bench", "llama-quantize", "llama-mtmd-cli")
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release")
CONVERT_REQS = ("transformers==4.57.6", "sentencepiece>=0.1.98,<0.3.0", "protobuf>=4.21.0,<5.0.0")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json",
                   "preprocessor_config.json", "generation_config.json")
QUANTS = ("Q8_0", "Q4_0")
# GCC 12 with -march=native dead-store-eliminates the AMX tile config before ldtilecfg, so every batched matmul on
# quantized weights dies with SIGILL at tileloadd on AMX CPUs (cf. upstream llama.cpp PR #26954): a compiler
# barrier keeps the stores. Applied only where the CPU has AMX (elsewhere that code is not compiled in).
AMX_FILE = "ggml/src/ggml-cpu/amx/mmq.cpp"
AMX_ANCHOR = "    _tile_loadconfig(&tc);\n"
AMX_FIX = "    asm volatile(\"\" : : \"r\"(&tc) : \"memory\");  /* qwen2vl bench: keep the tile config stores */\n"


def log(msg: str) -> None:
    print(f"[llama.cpp setup {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, **kw) -> None:
    log(" ".join(map(str, cmd)))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    return set(cpuinfo().get("flags", "").split())


def source_tree() -> Path:
    """The vendored llama.cpp of the sdist, downloaded and unpacked once."""
    tree = CACHE / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tarball.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={SDIST_VERSION}", "-d", CACHE])
    run(["tar", "xzf", tarball, "-C", CACHE])
    return tree


def apply_amx_fix(tree: Path) -> bool:
    """Insert the compiler barrier once (idempotent); True if the tree carries it."""
    src = tree / AMX_FILE
    text = src.read_text()
    if AMX_FIX in text:
        return True
    if text.count(AMX_ANCHOR) != 1:
        log(f"AMX fix: anchor not found once in {src}; building unpatched")
        return False
    src.write_text(text.replace(AMX_ANCHOR, AMX_FIX + AMX_ANCHOR))
    return True


def build(tree: Path) -> Path:
    """cmake build of the three tools (-march=native, so the build belongs to this machine's CPU); its bin dir."""
    bindir, stamp = tree / "build" / "bin", tree / "build" / "qwen2vl-bench-cpu"
    info = cpuinfo()
    cpu = f"{info.get('model name')} | family {info.get('cpu family')} model {info.get('model')} | {info.get('flags')}"
    if all((bindir / t).is_file() for t in TARGETS):
        if not stamp.is_file():  # a build from before the stamp existed: taken as this machine's
            stamp.write_text(cpu)
        if stamp.read_text() == cpu:
            return bindir
        log("the cached build is for another CPU (-march=native): rebuilding")
        shutil.rmtree(tree / "build")
    if cpu_flags() & {"amx_tile", "amx_int8"}:
        log(f"AMX CPU: fix applied: {apply_amx_fix(tree)}")
    t0 = time.time()
    run(["cmake", "-S", tree, "-B", tree / "build", *CMAKE_FLAGS], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", tree / "build", f"-j{os.cpu_count() or 2}", "--target", *TARGETS],
        stdout=subprocess.DEVNULL)
    stamp.write_text(cpu)
    log(f"built in {time.time() - t0:.0f} s")
    return bindir


def convert_venv(tree: Path) -> Path:
    """The converter's Python: a venv with transformers 4.x and the tree's gguf-py (not this project's env)."""
    venv = CACHE / "venv-convert"
    py = venv / "bin" / "python"
    marker = venv / "qwen2vl-bench-ok"
    if marker.is_file():
        return py
    run([sys.executable, "-m", "venv", "--clear", venv])
    import torch

    torch_req = f"torch=={torch.__version__.split('+')[0]}"  # this project's torch: a local wheel where mirrored
    run([py, "-m", "pip", "install", "-q", torch_req, *CONVERT_REQS, tree / "gguf-py"])
    marker.write_text("ok\n")
    return py


def checkpoint() -> Path:
    """Random weights of the real 2B shape in qwen2vl's save_pretrained layout (the hub's legacy keys `model.*`,
    `visual.*`, which the converter reads), with the real config and tokenizer files."""
    sys.path.insert(0, str(ROOT))
    from bench_multiturn import META, build_model  # noqa: E402 (benchmarks/ is on sys.path)

    ckpt = CACHE / "ckpt-2b-seed0"
    if (ckpt / "qwen2vl-bench-ok").is_file():
        return ckpt
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    log(f"writing the random-weight 2B checkpoint to {ckpt}")
    build_model(ckpt, small=False)
    # the converter (transformers 4.x) reads the original flat config.json; ours is the same model
    (ckpt / "config.json").unlink()
    shutil.copy(META / "config.json", ckpt / "config.json")
    (ckpt / "qwen2vl-bench-ok").write_text("ok\n")
    return ckpt


def gguf_files(tree: Path, bindir: Path, ckpt: Path) -> dict[str, Path]:
    """{'BF16' | 'Q8_0' | 'Q4_0' | 'mmproj': path}: converted / quantized once each."""
    out = CACHE / "gguf"
    out.mkdir(exist_ok=True)
    files = {"BF16": out / "qwen2vl-2b-rand-bf16.gguf", "mmproj": out / "mmproj-qwen2vl-2b-rand-f16.gguf"}
    files.update({q: out / f"qwen2vl-2b-rand-{q}.gguf" for q in QUANTS})
    need = [k for k, p in files.items() if not p.is_file()]
    if not need:
        return files
    py = convert_venv(tree)
    conv = [py, tree / "convert_hf_to_gguf.py", ckpt]
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"}
    for key, extra in (("BF16", ["--outtype", "bf16"]), ("mmproj", ["--mmproj", "--outtype", "f16"])):
        if key in need:
            tmp = files[key].with_suffix(".tmp")
            run([*conv, *extra, "--outfile", tmp], env=env, stdout=subprocess.DEVNULL)
            tmp.rename(files[key])
    for q in QUANTS:
        if q in need:
            tmp = files[q].with_suffix(".tmp")
            run([bindir / "llama-quantize", files["BF16"], tmp, q, "2"], stdout=subprocess.DEVNULL)
            tmp.rename(files[q])
    return files


def noise_image(width: int = 1024, height: int = 768) -> Path:
    import numpy as np
    from PIL import Image

    path = CACHE / f"img_{width}x{height}.png"
    if not path.is_file():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def setup() -> dict:
    """Run every missing step; the paths bench_llamacpp.py needs."""
    tree = source_tree()
    bindir = build(tree)
    ckpt = checkpoint()
    files = gguf_files(tree, bindir, ckpt)
    return {"tree": tree, "bin": bindir, "ckpt": ckpt, "gguf": files,
            "amx_fix": AMX_FIX in (tree / AMX_FILE).read_text()}


if __name__ == "__main__":
    print(json.dumps({k: str(v) for k, v in setup().items()}, indent=1))
