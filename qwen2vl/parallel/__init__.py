"""Tensor parallelism (issue #8): `tp.load_tensor_parallel` (via `from_pretrained(..., tp_plan="auto")`),
`tp.parallelize`, and the rank launcher / rank-0 driver in `launch`."""
from __future__ import annotations

from .tp_runner import TPRunner, launch, tp_main, worker_loop
from .group import TPGroup, serve_tensor_parallel, start_tensor_parallel
from .tp import (TPContext, check_tp_sizes, get_context, init_distributed, load_tensor_parallel, parallelize,
                 sync_rng_state, text_parameter_count)

__all__ = ["TPContext", "TPGroup", "TPRunner", "check_tp_sizes", "get_context", "init_distributed", "launch",
           "load_tensor_parallel", "parallelize", "serve_tensor_parallel", "start_tensor_parallel", "sync_rng_state",
           "text_parameter_count", "tp_main", "worker_loop"]
