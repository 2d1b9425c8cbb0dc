"""Offline batch inference: `LLM(model).generate(prompts, SamplingParams(...)) -> list[RequestOutput]`.

Prompts are conversations (lists of messages, images/videos in content blocks), strings (raw prompts),
or dicts (see `qwen2vl.engine.prompts`). All requests go through the continuous-batching engine; outputs come
back in input order.

`LLM(path, tensor_parallel_size=N)`: this process becomes rank 0 of N tensor-parallel ranks (N-1 spawned
workers; gloo on the CPU, NCCL with one GPU per rank); the engine runs here and mirrors every model call on all
ranks. `llm.shutdown()` (or `with LLM(...) as llm:`, or interpreter exit) stops the workers.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Sequence

from .prompts import _is_conversation
from .llm_engine import EngineConfig, LLMEngine
from .model_setup import load_model, load_processor, start_tp
from .sampling_params import SamplingParams
from .sequence import RequestOutput


class LLM:
    def __init__(self, model: Any = "qwen2vl-demo", *, processor: Any = None, dtype: Any = None,
                 device: Any = None, attn_implementation: str | None = None, tensor_parallel_size: int = 1,
                 tp_num_threads: int | None = None, quantization: str | None = None, **engine_kwargs):
        """`model`: a path, hub id, 'qwen2vl-demo' or a loaded `Qwen2VLForConditionalGeneration`.
        `processor`: defaults to the one saved with the model (None for a model instance: token-id prompts only).
        `tensor_parallel_size`: ranks to shard the model over (needs a path; `device` 'cpu' forces gloo, 'cuda'
        NCCL); `tp_num_threads`: torch threads per rank. `quantization`: "int8" | "int4" weight-only
        quantization of the decoder at load (a path only; not with tensor parallelism).
        `engine_kwargs`: `EngineConfig` fields (max_num_seqs, max_model_len, kv_cache_memory, ...)."""
        config = EngineConfig(**engine_kwargs)
        self._tp = None
        tp_runner = None
        if tensor_parallel_size != 1:
            if quantization is not None:
                raise ValueError("quantization is not supported together with tensor parallelism")
            self._tp = start_tp(model, tensor_parallel_size, dtype=dtype, device=device,
                                attn_implementation=attn_implementation, num_threads=tp_num_threads)
            self._finalizer = weakref.finalize(self, self._tp.shutdown)
            tp_runner = self._tp.runner
            self.model = tp_runner.model
        else:
            self.model = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                    quantization=quantization)
        try:
            if processor is None and isinstance(model, (str, os.PathLike)):
                processor = load_processor(model)
            self.processor = processor
            self.engine = LLMEngine(self.model, processor, config, tp_runner=tp_runner)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op for a single-process LLM)."""
        if self._tp is not None:
            self._finalizer()
            self._tp = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order. A single prompt (string, conversation or dict) is accepted
        too. Raises the request's error if one failed inside the engine (e.g. a bad image)."""
        if isinstance(prompts, (str, dict)) or _is_conversation(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"Got {len(sampling_params)} sampling params for {len(prompts)} prompts.")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        engine = self.engine
        requests = [engine.make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        for r in requests:
            engine.add_prepared(r)
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for r in requests:
                engine.abort_request(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        results = [finals[r.request_id] for r in requests]
        for out in results:
            if out.error is not None:
                raise out.error
        return results

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """`messages`: one conversation or a list of conversations."""
        convs = [messages] if _is_conversation(messages) else list(messages)
        return self.generate([{"messages": c} for c in convs], sampling_params, use_tqdm=use_tqdm)

