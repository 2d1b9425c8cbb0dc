"""Driving tensor-parallel ranks from rank 0: `TPRunner` and its counterpart on the other ranks, `worker_loop`.

Under tensor parallelism every rank must run exactly the same model calls in the same order (each forward
contains collectives). For serving, rank 0 owns the HTTP server and the other ranks sit in `worker_loop`:
rank 0 calls the model only through a `TPRunner`, which first broadcasts the call (pickled, on a gloo control
group) and then runs it locally; each worker runs the same call on its own shards and objects. The ranks are
started by `spawn.launch`, `group.start_tensor_parallel` / `serve_tensor_parallel`, or torchrun (`group.tp_main`).

`TPRunner` API (rank 0): `runner.model`, `runner(**forward_kwargs)`, `runner.generate(*a, **kw)`,
`runner.run(fn, *a, **kw)` (fn(model, *a, **kw) on every rank; fn must be importable: a module-level
function), `runner.create(name, factory, *a, **kw)` (a per-rank object, e.g. an engine around the local model:
`factory(model, *a, **kw)`), `runner.call(name, method, *a, **kw)`, `runner.seed(s)`, `runner.shutdown()`.
`rank0_kwargs=` passes arguments only rank 0 gets (streamers, callbacks). Tensors are sent through the CPU; a
worker puts a tensor that was on CUDA on rank 0 onto its own device. Return values come from rank 0.
"""
from __future__ import annotations

import sys
import threading
import traceback

import torch
import torch.distributed as dist

from .tp import get_context


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
