"""Tensor parallelism (issue #8): `tp.load_tensor_parallel` (via `from_pretrained(..., tp_plan="auto")`),
`tp.parallelize`; `spawn.launch` (run a function on N spawned ranks); `tp_runner` (rank 0's `TPRunner`, the
workers' `worker_loop`); `group` (ranks whose rank 0 is this process: `start_tensor_parallel`, `tp_main`)."""
from __future__ import annotations

from .group import TPGroup, serve_tensor_parallel, start_tensor_parallel, tp_main
from .spawn import launch
from .tp_runner import TPRunner, worker_loop
from .tp import (TPContext, check_tp_sizes, get_context, init_distributed, load_tensor_parallel, parallelize,
                 sync_rng_state, text_parameter_count)

__all__ = ["TPContext", "TPGroup", "TPRunner", "check_tp_sizes", "get_context", "init_distributed", "launch",
           "load_tensor_parallel", "parallelize", "serve_tensor_parallel", "start_tensor_parallel", "sync_rng_state",
           "text_parameter_count", "tp_main", "worker_loop"]
