"""Tensor-parallel groups whose rank 0 is this process: `start_tensor_parallel` / `TPGroup`, `serve_tensor_parallel`
(N-1 spawned workers), and `tp_main` (every rank started by torchrun).

Workers (`_serve_worker`) load their shards and run `worker_loop` until rank 0's runner sends stop; they ignore
SIGINT (Ctrl-C reaches the whole process group, rank 0 decides) and exit by themselves when rank 0's process
disappears. `TPGroup.shutdown()` stops and joins them, leaves the process group and restores this process's
environment and torch thread count; after a worker died it skips the collectives (they would fail or hang).
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..checkpoint import resolve_model_dir
from ..configuration import Qwen2VLConfig
from ..model_files import resolve_name
from ..model import Qwen2VLForConditionalGeneration
from .spawn import set_rank_env
from .tp import check_tp_sizes, free_port
from .tp_runner import TPRunner, worker_loop


def load_rank_model(model_path, load_kwargs: dict, tp_size: int | None):
    """This rank's shards of the checkpoint (`from_pretrained(model_path, tp_plan="auto", **load_kwargs)`)."""
    kwargs = dict(load_kwargs or {})
    kwargs.setdefault("tp_plan", "auto")
    return Qwen2VLForConditionalGeneration.from_pretrained(model_path, tp_size=tp_size, **kwargs)


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Exit this worker when the rank-0 process is gone (killed without a chance to send 'stop')."""
    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="qwen2vl-tp-parent-watch", daemon=True).start()


def _serve_worker(rank, world, port, num_threads, model_path, load_kwargs, backend=None, parent_pid=None):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # rank 0 decides when workers stop (Ctrl-C hits the group)
    if parent_pid is not None:
        _watch_parent(parent_pid)
    set_rank_env(rank, world, port)
    if backend:
        os.environ["QWEN2VL_TP_BACKEND"] = backend
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        worker_loop(load_rank_model(model_path, load_kwargs, world))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "QWEN2VL_TP_BACKEND")


class TPGroup:
    """Ranks started by `start_tensor_parallel`: `group.runner` (rank 0 = this process), `group.shutdown()`
    (stops and joins the workers, leaves the process group, restores this process's environment)."""

    def __init__(self, procs, env_before: dict):
        self.procs, self._env_before = procs, env_before
        self._threads_before = torch.get_num_threads()
        self.runner: TPRunner | None = None

    def shutdown(self, timeout: float = 30.0) -> None:
        broken = any(p.exitcode is not None for p in self.procs)   # a worker died: collectives would fail/hang
        if self.runner is not None:
            if broken:
                self.runner._closed = True
            else:
                try:
                    self.runner.shutdown()
                except Exception:
                    traceback.print_exc()
                    broken = True
            self.runner = None
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(5)
        self.procs = []
        if dist.is_initialized() and not broken:
            dist.destroy_process_group()
        for k, v in self._env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._env_before = {}
        torch.set_num_threads(self._threads_before)

    def __enter__(self) -> "TPGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_tensor_parallel(model_path, tp_size: int, *, num_threads: int | None = None,
                          master_port: int | None = None, backend: str | None = None, **load_kwargs) -> TPGroup:
    """Make this process rank 0 of `tp_size` ranks (tp_size-1 spawned workers in `worker_loop`), load the model
    everywhere (`from_pretrained(model_path, tp_plan="auto", **load_kwargs)`) and return the `TPGroup`; call
    `group.shutdown()` when done. `backend`: gloo | nccl (default: nccl with CUDA, else gloo; on CUDA rank r
    uses cuda:r). `num_threads`: torch threads per rank (rank 0 included)."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed process group")
    check_tp_sizes(Qwen2VLConfig.from_pretrained(resolve_model_dir(resolve_name(model_path))).text_config,
                   tp_size)      # before any process is started
    port = master_port or free_port()
    env_before = {k: os.environ.get(k) for k in _ENV_KEYS}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_serve_worker, args=(r, tp_size, port, num_threads, model_path, load_kwargs,
                                                     backend, os.getpid()), daemon=True)
             for r in range(1, tp_size)]
    for p in procs:
        p.start()
    group = TPGroup(procs, env_before)
    try:
        set_rank_env(0, tp_size, port)
        if backend:
            os.environ["QWEN2VL_TP_BACKEND"] = backend
        if num_threads:
            torch.set_num_threads(num_threads)
        group.runner = TPRunner(load_rank_model(model_path, load_kwargs, tp_size))
    except BaseException:
        group.shutdown(timeout=5)
        raise
    return group


def serve_tensor_parallel(model_path, tp_size: int, serve, *, num_threads: int | None = None,
                          master_port: int | None = None, backend: str | None = None, **load_kwargs):
    """`qwen2vl serve --tensor-parallel-size N`: this process is rank 0 (it runs `serve(runner)`, e.g. the
    HTTP server, whose model calls go through `runner`); N-1 worker processes are spawned and stopped at the
    end. On CUDA rank r uses cuda:r."""
    group = start_tensor_parallel(model_path, tp_size, num_threads=num_threads, master_port=master_port,
                                  backend=backend, **load_kwargs)
    try:
        return serve(group.runner)
    finally:
        group.shutdown()


def tp_main(model_path, serve, **load_kwargs):
    """Under torchrun (`torchrun --nproc-per-node N app.py`): load on every rank; rank 0 returns `serve(runner)`,
    the other ranks run the worker loop and return None when rank 0 shuts the runner down."""
    model = load_rank_model(model_path, load_kwargs, None)
    if model.tp_context.rank != 0:
        worker_loop(model)
        return None
    runner = TPRunner(model)
    try:
        return serve(runner)
    finally:
        runner.shutdown()
