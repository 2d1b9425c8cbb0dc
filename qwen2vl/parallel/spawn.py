"""Spawning tensor-parallel ranks: `launch(fn, tp_size, args)` runs `fn(*args)` in `tp_size` processes
(torch.multiprocessing, spawn) with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT, `set_rank_env`) and returns rank 0's result. Long-lived groups (rank 0 = this process) are in `group`.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .tp import free_port


# ----------------------------------------------------------------------------------------------- spawning
def set_rank_env(rank: int, world: int, port: int, local_rank: int | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank if local_rank is None
                                                                            else local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _entry(rank, world, port, num_threads, fn, args, queue):
    set_rank_env(rank, world, port)
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
