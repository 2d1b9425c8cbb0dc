"""Running tensor-parallel ranks: spawning them, and driving them from rank 0 (serving).

Under tensor parallelism every rank must run exactly the same model calls in the same order (each forward
contains collectives). For serving, rank 0 owns the HTTP server and the other ranks sit in `worker_loop`:
rank 0 calls the model only through a `TPRunner`, which first broadcasts the call (pickled, on a gloo control
group) and then runs it locally; each worker runs the same call on its own shards and objects.

* `launch(fn, tp_size, args)`: spawn `tp_size` processes (torch.multiprocessing, spawn) with torchrun's env
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) running `fn(*args)`; returns rank 0's result.
* `serve_tensor_parallel(model_path, tp_size, serve, **load_kwargs)` (in `.serving`, re-exported): this
  process becomes rank 0, tp_size-1 workers are spawned; loads the model everywhere and returns
  `serve(runner)` (called on rank 0 only).
* `start_tensor_parallel(model_path, tp_size, **load_kwargs) -> TPGroup` (`.serving`): the same without the
  callback (`group.runner`, `group.shutdown()`), for long-lived owners such as `LLM(..., tensor_parallel_size=N)`
  and `qwen2vl serve --tensor-parallel-size N`. Workers ignore SIGINT and exit if rank 0's process disappears.
* `tp_main(model_path, serve, **load_kwargs)`: the same under torchrun (`torchrun --nproc-per-node N app.py`):
  rank 0 calls `serve(runner)`, the other ranks run the worker loop.

`TPRunner` API (rank 0): `runner.model`, `runner(**forward_kwargs)`, `runner.generate(*a, **kw)`,
`runner.run(fn, *a, **kw)` (fn(model, *a, **kw) on every rank; fn must be importable: a module-level
function), `runner.create(name, factory, *a, **kw)` (a per-rank object, e.g. an engine around the local model:
`factory(model, *a, **kw)`), `runner.call(name, method, *a, **kw)`, `runner.seed(s)`, `runner.shutdown()`.
`rank0_kwargs=` passes arguments only rank 0 gets (streamers, callbacks). Tensors are sent through the CPU; a
worker puts a tensor that was on CUDA on rank 0 onto its own device. Return values come from rank 0.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from .tp import free_port, get_context


# ----------------------------------------------------------------------------------------------- spawning
def _set_env(rank: int, world: int, port: int, local_rank: int | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank if local_rank is None
                                                                            else local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _entry(rank, world, port, num_threads, fn, args, queue):
    _set_env(rank, world, port)
    if num_threads:
        torch.set_num_threads(num_threads)
    ok = False
    try:
        result = fn(*args)
        if rank == 0:
            queue.put((True, result))
        ok = True
    except BaseException:
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        if rank == 0:
            queue.put((False, tb))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without interpreter teardown: destroying gloo's / torch's background threads there occasionally
    # aborts the process ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


def launch(fn, tp_size: int, args: tuple = (), *, master_port: int | None = None, num_threads: int | None = None,
           timeout: float | None = None):
    """Run `fn(*args)` in `tp_size` spawned processes (ranks 0..N-1) and return rank 0's result.
    `fn` must be importable by the children (a module-level function). A failing rank stops the others and
    raises RuntimeError (with rank 0's traceback when it is the one that failed)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = master_port or free_port()
    procs = [ctx.Process(target=_entry, args=(r, tp_size, port, num_threads, fn, args, queue), daemon=False)
             for r in range(tp_size)]
    for p in procs:
        p.start()
    result, start = None, time.monotonic()
    try:
        while True:
            if not queue.empty() and result is None:
                result = queue.get()
            codes = [p.exitcode for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                if result is None and not queue.empty():
                    result = queue.get()
                detail = f"\n{result[1]}" if result is not None and not result[0] else ""
                raise RuntimeError(f"tensor-parallel rank(s) failed (rank, exit code): {failed}{detail}")
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"tensor-parallel ranks still running after {timeout}s")
            time.sleep(0.05)
        if result is None and not queue.empty():
            result = queue.get()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
    if result is None:
        raise RuntimeError("rank 0 finished without returning a result")
    return result[1]


# ----------------------------------------------------------------------------------------------- commands
class _Tensor:
    """A tensor in transit: CPU data + whether it lived on CUDA on rank 0."""

    def __init__(self, t: torch.Tensor):
        self.data, self.cuda = t.detach().cpu(), t.is_cuda


def _map(obj, fn):
    if isinstance(obj, (torch.Tensor, _Tensor)):
        return fn(obj)
    if isinstance(obj, dict):
        items = {k: _map(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except Exception:
            return items
    if isinstance(obj, (list, tuple)):
        items = [_map(v, fn) for v in obj]
        return type(obj)(items) if type(obj) in (list, tuple) else (type(obj)(*items) if hasattr(obj, "_fields")
                                                                    else items)
    return obj


def _pack(obj):
    return _map(obj, lambda t: _Tensor(t) if isinstance(t, torch.Tensor) else t)


def _unpack(obj, device: torch.device):
    return _map(obj, lambda t: (t.data.to(device) if t.cuda and device.type == "cuda" else t.data)
                if isinstance(t, _Tensor) else t)


def _forward(model, *args, **kwargs):
    return model(*args, **kwargs)


def _generate(model, *args, **kwargs):
    return model.generate(*args, **kwargs)


def _seed(model, seed: int):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _execute(objects: dict, model, cmd):
    op = cmd[0]
    if op == "run":
        _, fn, args, kwargs = cmd
        return fn(model, *args, **kwargs)
    if op == "create":
        _, name, factory, args, kwargs = cmd
        objects[name] = factory(model, *args, **kwargs)
        return objects[name]
    if op == "call":
        _, name, method, args, kwargs = cmd
        return getattr(objects[name], method)(*args, **kwargs)
    raise ValueError(f"unknown tensor-parallel command {op!r}")


def _all_ok(ctx, ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ctx.control_group)
    return bool(flag.item())


class TPRunner:
    """Rank-0 handle on a tensor-parallel model: every call is mirrored on all ranks (thread-safe, serialized)."""

    def __init__(self, model):
        self.model = model
        self.ctx = getattr(model, "tp_context", None) or get_context()
        if self.ctx is None or self.ctx.rank != 0:
            raise ValueError("TPRunner runs on rank 0 of a tensor-parallel model (load it with tp_plan='auto')")
        self._objects: dict = {"model": model}
        self._lock = threading.RLock()
        self._closed = False

    def _do(self, cmd, rank0_kwargs=None):
        with self._lock:
            if self._closed:
                raise RuntimeError("TPRunner was shut down")
            if self.ctx.world_size > 1:
                packed = cmd[:-2] + (_pack(cmd[-2]), _pack(cmd[-1]))
                dist.broadcast_object_list([packed], src=0, group=self.ctx.control_group)
                if not _all_ok(self.ctx, True):
                    raise RuntimeError(f"a tensor-parallel worker could not decode the {cmd[0]!r} command (functions "
                                       "and factories must be importable module-level objects); see its stderr")
            if rank0_kwargs:
                cmd = cmd[:-1] + ({**cmd[-1], **rank0_kwargs},)
            with torch.no_grad():
                return _execute(self._objects, self.model, cmd)

    def run(self, fn, *args, rank0_kwargs=None, **kwargs):
        return self._do(("run", fn, args, kwargs), rank0_kwargs)

    def create(self, name: str, factory, *args, rank0_kwargs=None, **kwargs):
        return self._do(("create", name, factory, args, kwargs), rank0_kwargs)

    def call(self, name: str, method: str, *args, rank0_kwargs=None, **kwargs):
        return self._do(("call", name, method, args, kwargs), rank0_kwargs)

    def __call__(self, *args, **kwargs):
        return self.run(_forward, *args, **kwargs)

    def generate(self, *args, rank0_kwargs=None, **kwargs):
        return self.run(_generate, *args, rank0_kwargs=rank0_kwargs, **kwargs)

    def seed(self, seed: int) -> None:
        self.run(_seed, seed)

    def shutdown(self) -> None:
        with self._lock:
            if not self._closed and self.ctx.world_size > 1:
                dist.broadcast_object_list([("stop",)], src=0, group=self.ctx.control_group)
            self._closed = True


def worker_loop(model) -> None:
    """Ranks > 0: execute rank 0's broadcast commands until it sends stop. Errors are reported and the loop
    goes on (rank 0 sees the same error for the same call and reports it to its caller)."""
    ctx = getattr(model, "tp_context", None) or get_context()
    objects = {"model": model}
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=ctx.control_group)
            cmd = box[0]
            if cmd[0] == "stop":
                return
            cmd = cmd[:-2] + (_unpack(cmd[-2], ctx.device), _unpack(cmd[-1], ctx.device))
            ok = True
        except Exception:
            print(f"[qwen2vl tp rank {ctx.rank}] could not decode a command:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            ok = False
        if not _all_ok(ctx, ok):      # every rank runs the command, or none does
            continue
        try:
            with torch.no_grad():
                _execute(objects, model, cmd)
        except Exception:
            print(f"[qwen2vl tp rank {ctx.rank}] command {cmd[0]} failed:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- serving
def _load(model_path, load_kwargs: dict, tp_size: int | None):
    from ..model import Qwen2VLForConditionalGeneration

    kwargs = dict(load_kwargs or {})
    kwargs.setdefault("tp_plan", "auto")
    return Qwen2VLForConditionalGeneration.from_pretrained(model_path, tp_size=tp_size, **kwargs)


def tp_main(model_path, serve, **load_kwargs):
    """Under torchrun: load on every rank; rank 0 returns `serve(runner)`, other ranks return None when rank 0
    shuts the runner down."""
    model = _load(model_path, load_kwargs, None)
    if model.tp_context.rank != 0:
        worker_loop(model)
        return None
    runner = TPRunner(model)
    try:
        return serve(runner)
    finally:
        runner.shutdown()


# `serve_tensor_parallel` / `start_tensor_parallel` / `TPGroup` live in .serving (re-exported here).
from .group import TPGroup, serve_tensor_parallel, start_tensor_parallel  # noqa: E402,F401
