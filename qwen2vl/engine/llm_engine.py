"""`LLMEngine`: the synchronous continuous-batching core (add requests, `step()`, abort).

One `step()`:
1. admit waiting requests that fit (free KV rows, prefill budget); prefill each into its own row, copy the row
   for n > 1, sample every sequence's first token;
2. one decode step over all sequences that were already running (rows [0, k), input (k, 1));
3. finished sequences free their rows at once; the running rows are compacted.
It returns a `RequestOutput` (with deltas) for every request that produced tokens or finished.
Not thread-safe: `AsyncEngine` drives it from a single background thread.

Tensor parallelism: `LLMEngine(runner.model, processor, config, tp_runner=runner)` on rank 0 of a
`qwen2vl.parallel` group; scheduling, sampling and detokenizing stay on rank 0, every forward and KV-row
operation is mirrored on all ranks (`runner.TPWorker`).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from .. import guided_decoding as guided
from ..model.vision_job import make_choices, text_flops_per_token
from .kv_pool import KVPool, kv_bytes_per_token, local_kv_heads, parse_memory, pool_rows
from .lora_adapters import LoraAdapters
from .model_setup import default_eos_ids
from .prefill_budget import PrefillBudget
from .prefix_cache import PrefixCache, PrefixReuse
from .prompts import InputProcessor, ProcessedPrompt
from .runner import ModelRunner, make_worker
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, RequestOutput, RequestRejected


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_model_len: int | None = None  # default: min(max_position_embeddings, 8192)
    kv_cache_memory: int | str | None = None  # bytes or '2GiB'; caps the number of KV rows
    max_num_batched_tokens: int = 8192  # prefill tokens per step (at least one request)
    max_queue: int | None = None  # waiting requests before QueueFull
    eos_token_ids: list[int] | None = None  # default: generation_config.json + config + tokenizer eos
    enable_prefix_caching: bool = True  # reuse the KV of earlier prompts/answers (keyed by tokens + media content)
    prefix_cache_memory: int | str | None = None  # bytes or '1GiB'; default min(1 GiB, the KV pool's size)
    vision_cache_memory: int | str | None = "256MiB"  # vision-tower outputs cached by picture content; 0 = off
    max_prefill_tokens_per_step: int | None = None  # chunked prefill: at most this many prompt tokens per step
    max_prefill_ms_per_step: float | str | None = None  # chunked prefill: ~this much prefill time per step, or
    # "auto": the measured decode step's (see prefill_budget)


class LLMEngine:
    def __init__(self, model, processor=None, config: EngineConfig | None = None, *, tp_runner=None, **kwargs):
        """`tp_runner`: a `qwen2vl.parallel.TPRunner` (rank 0) whose model is `model`: run under tensor parallelism."""
        config = config or EngineConfig(**kwargs)
        self.config = config
        if tp_runner is not None and tp_runner.model is not model:
            raise ValueError("tp_runner.model must be the model given to the engine")
        self.model = model.eval()
        self.tp_runner = tp_runner
        tc = model.config.text_config
        self.max_model_len = int(config.max_model_len or min(tc.max_position_embeddings, 8192))
        self.vocab_size = tc.vocab_size
        vision_bytes = parse_memory(config.vision_cache_memory) or 0
        kv_heads = local_kv_heads(model)  # this rank's share under tensor parallelism
        per_token = kv_bytes_per_token(tc, kv_heads, model.dtype)
        rows = pool_rows(config.max_num_seqs, self.max_model_len, per_token, config.kv_cache_memory)
        worker = make_worker(model, rows, self.max_model_len, kv_heads, tp_runner, vision_bytes)  # owns the cache
        self.pool = KVPool(worker, rows, self.max_model_len, per_token)  # row bookkeeping
        self.runner = ModelRunner(worker, model, local=tp_runner is None)
        self.prefix = None  # the prefix cache's index; self.reuse: it with the worker's KV copies
        if config.enable_prefix_caching:
            budget = parse_memory(config.prefix_cache_memory)
            self.prefix = PrefixCache(min(1 << 30, self.pool.bytes) if budget is None else budget, per_token)
        self.reuse = PrefixReuse(self.prefix, self.runner, model.config)
        self.budget = PrefillBudget(config.max_prefill_tokens_per_step, config.max_prefill_ms_per_step,
                                    text_flops_per_token(tc))  # how much prefill work a step may do
        self.scheduler = Scheduler(self.pool, max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_queue=config.max_queue)
        self.inputs = InputProcessor(processor, model.config)
        self.tokenizer = self.inputs.tokenizer
        eos = config.eos_token_ids if config.eos_token_ids is not None else default_eos_ids(model, self.tokenizer)
        self.eos_ids = frozenset(eos)
        self.guide_tokenizer: guided.GuideTokenizer | None = None  # built at the first constrained request
        self._ids = itertools.count()
        self.peak_running = 0  # most sequences decoded together so far (observability)
        self.partial: Request | None = None  # the request whose prompt is being prefilled over several steps
        self.loras: LoraAdapters | None = None  # served LoRA adapters (add_lora)

    # ------------------------------------------------------------------------------------------ requests
    @property
    def processor(self):
        """The processor (or bare tokenizer, or None) prompts are prepared with: its image processor's size caps
        are what a client should resize uploads to."""
        return self.inputs.processor

    def process_prompt(self, prompt, media_limits=None) -> ProcessedPrompt:
        """Tokenize / render / preprocess media (CPU work that can run off the step thread); `media_limits`: see
        `InputProcessor.process`."""
        return self.inputs.process(prompt, media_limits=media_limits)

    def encode_media(self, pp: ProcessedPrompt) -> None:
        """Encode a processed prompt's pictures/videos into the vision cache now (from a processing thread), so
        the step thread's prefill does not run the vision tower. Only for a local worker (under tensor
        parallelism every rank encodes during the mirrored prefill)."""
        if self.budget.chunked:
            # chunked prefill: the step thread encodes a slice per step between decode steps (vision_jobs); here
            # only the kernel choices for its sizes are made, so that timing them never stalls a step
            with torch.inference_mode():
                for grid in (pp.mm.image_grid_thw, pp.mm.video_grid_thw):
                    if grid is not None and self.tp_runner is None:
                        make_choices(self.model.visual, int(grid.prod(-1).sum()))
            return
        self.runner.encode_media(pp)

    def add_lora(self, name: str, path) -> None:
        """Serve the PEFT LoRA folder `path` as adapter `name` (requests pick it with `lora=name`); read now,
        once. ValueError for a folder that cannot be served (see `lora_adapters`)."""
        if self.tp_runner is not None:
            raise ValueError("LoRA adapters per request are not supported with tensor parallelism yet")
        if self.loras is None:
            self.loras = LoraAdapters(self.model)
        self.loras.add(name, path)
        self.runner.use_loras(self.loras)

    @property
    def lora_names(self) -> list[str]:
        return [] if self.loras is None else list(self.loras.names)

    def make_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     lora: str | None = None) -> Request:
        """Validate a prompt (raw or `ProcessedPrompt`) against the engine limits; raises RequestRejected.
        `lora`: the name of an adapter added with `add_lora` (None: the base model)."""
        if lora is not None and lora not in self.lora_names:
            raise RequestRejected(f"The model `{lora}` does not exist.")
        params = params or SamplingParams()
        pp = prompt if isinstance(prompt, ProcessedPrompt) else self.process_prompt(prompt)
        n_prompt = len(pp.token_ids)
        if n_prompt == 0:
            raise RequestRejected("The prompt is empty.")
        if any(not 0 <= t < self.vocab_size for t in pp.token_ids):
            raise RequestRejected(f"Prompt token ids must be in [0, {self.vocab_size}).")
        if params.n > self.pool.max_num_seqs:
            raise RequestRejected(f"n={params.n} is larger than the number of sequences the engine can run at "
                                  f"once (max_num_seqs={self.pool.max_num_seqs}).")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n_prompt
        if max_tokens < 1 or n_prompt + max_tokens > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the messages, {max(max_tokens, 1)} in the "
                "completion). Please reduce the length of the messages or completion.")
        if max_tokens != params.max_tokens:
            params = params.clone(max_tokens=max_tokens)
        grammar = self._compile_grammar(params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, pp.token_ids, params, mm=pp.mm, prompt=pp.prompt, tokenizer=self.tokenizer,
                      device=self.runner.device, eos_ids=self.eos_ids)
        req.adapter = -1 if lora is None else self.loras.index(lora)
        req.keys = self.reuse.keys(pp, lora)
        if grammar is not None:
            for s in req.seqs:
                s.guide = guided.Guide(self.guide_tokenizer, grammar)
        return req

    def _compile_grammar(self, params: SamplingParams) -> str | None:
        """The request's llguidance grammar (None if unconstrained); a bad one is RequestRejected (HTTP 400)."""
        try:
            grammar = guided.compile_grammar(params)
        except ValueError as e:
            raise RequestRejected(str(e)) from None
        if grammar is not None and self.guide_tokenizer is None:
            if self.tokenizer is None:
                raise RequestRejected("Structured output needs a tokenizer (the engine has none).")
            self.guide_tokenizer = guided.GuideTokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
        return grammar

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    lora: str | None = None) -> Request:
        request = self.make_request(prompt, params, request_id, lora)
        self.scheduler.add(request)
        return request

    def add_prepared(self, request: Request) -> None:
        self.scheduler.add(request)

    @torch.inference_mode()
    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a waiting or running request; returns its final output (finish_reason 'abort')."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        for s in req.seqs:
            s.abort()
        return self._finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.partial is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_prefilling(self) -> int:
        """Requests whose prompt is being prefilled over several steps (0 or 1)."""
        return int(self.partial is not None)

    def _finish(self, req: Request) -> RequestOutput:
        req.finish_time = time.monotonic()
        if req is self.partial:  # aborted or failed mid-prefill: give back its reserved rows (and vision work)
            self.pool.unreserve(req.top_row, req.params.n)
            self.runner.vision_end(req)
            self.partial, req.top_row = None, None
        self.scheduler.remove(req)
        return req.output()

    def _fail(self, req: Request, err: BaseException) -> RequestOutput:
        req.error = err
        for s in req.seqs:
            s.abort()
        return self._finish(req)

    # ------------------------------------------------------------------------------------------ stepping
    @torch.inference_mode()  # the cache's rope_deltas are inference tensors: touch them only in this mode
    def step(self) -> list[RequestOutput]:
        sched, pool = self.scheduler, self.pool
        decode_seqs = list(sched.running)  # rows [0, k): compacted at the end of every step
        touched: dict[str, Request] = {}
        outputs: list[RequestOutput] = []
        for req in self._prefill(outputs):
            touched[req.request_id] = req
        self.peak_running = max(self.peak_running, len(sched.running))
        if decode_seqs:
            try:
                t0 = self.budget.clock()
                logits = self.runner.decode([s.last_token for s in decode_seqs], len(decode_seqs),
                                            [s.request.adapter for s in decode_seqs])
                tokens = sample(logits, decode_seqs)
                self.budget.decode_done(self.budget.clock() - t0)
            except Exception as e:  # a failed decode step poisons every running request
                for req in {id(s.request): s.request for s in decode_seqs}.values():
                    if req.request_id in sched.requests:
                        outputs.append(self._fail(req, e))
                decode_seqs, tokens = [], []
            for s, t in zip(decode_seqs, tokens):
                s.append(t, self.max_model_len)
                touched[s.request.request_id] = s.request
        done = [s for s in sched.running if s.finished]
        self.reuse.stash_finished(done, self.pool.cache.lengths)
        sched.release(done)
        for req in touched.values():
            if req.request_id not in sched.requests:
                continue
            outputs.append(self._finish(req) if req.finished else req.output())
        return outputs

    def _prefill(self, outputs: list) -> list[Request]:
        """Prefill this step's prompts; returns the requests whose prompt is complete (first token sampled).

        Whole prompts go straight into their decode rows. With chunked prefill (`self.budget`: prompt tokens and/or
        milliseconds per step), a prompt that does not fit is prefilled over several steps in rows reserved at the
        top of the pool (`self.partial`, one at a time) while the running sequences keep decoding."""
        pace = self.budget
        pace.start_step(decoding=bool(self.scheduler.running))
        complete = []
        if self.partial is not None:
            self._run_chunk(self.partial, outputs, complete)
        budget = pace.text_tokens()
        if self.partial is None and (budget is None or budget > 0):
            admitted = self.scheduler.admit(chunked=pace.chunked, budget=budget)
            for i, req in enumerate(admitted):
                if self.partial is not None:  # one prompt at a time is prefilled over several steps
                    self.scheduler.requeue(admitted[i:])
                    break
                n_prompt = len(req.prompt_token_ids)
                budget = pace.text_tokens()
                if budget is not None and (self._vision_begin(req) or n_prompt - self.reuse.cached_len(req) > budget):
                    req.top_row = self.pool.reserve(req.params.n)
                    self.partial = req
                    self.reuse.restore(req, req.top_row)
                    self._run_chunk(req, outputs, complete)
                    continue
                row = self.pool.allocate(req.params.n)
                for i, s in enumerate(req.seqs):
                    s.row = row + i
                self.scheduler.running.extend(req.seqs)
                try:
                    self.reuse.restore(req, row)
                    t0, start = pace.clock(), req.prefilled
                    logits = self.runner.prefill(req, row, start)
                    pace.text_done(n_prompt - start, pace.clock() - t0)
                    self._prompt_done(req, row, logits, complete)
                except Exception as e:  # bad inputs for this request only (e.g. vision/token mismatch)
                    outputs.append(self._fail(req, e))
        return complete

    def _vision_begin(self, req: Request) -> bool:
        """Plan the vision work of a request about to be prefilled in chunks (pictures not in the vision cache
        with placeholders past its cached prefix); True if there is some: it then runs a slice per step."""
        try:
            req.vision_pending = self.runner.vision_begin(req, self.reuse.cached_len(req))
        except Exception:  # bad vision inputs: the request fails in its first prefill chunk, as unchunked
            req.vision_pending = False
        return req.vision_pending

    def _run_vision(self, req: Request, outputs: list) -> bool:
        """This step's slice of the partial request's vision work (what `self.budget` allows, or one unit); True
        when the vision work is finished (its text may follow in the same step)."""
        try:
            done, spent, timings = self.runner.vision_run(req, *self.budget.vision())
        except Exception as e:
            outputs.append(self._fail(req, e))
            return False
        self.budget.vision_done(spent, timings)
        req.vision_pending = not done
        return done

    def _run_chunk(self, req: Request, outputs: list, complete: list) -> None:
        pace = self.budget
        if req.vision_pending and not self._run_vision(req, outputs):
            return
        budget = pace.text_tokens()
        if not budget:
            return
        n_prompt, start = len(req.prompt_token_ids), req.prefilled
        end = min(n_prompt, start + budget)
        try:
            t0 = pace.clock()
            logits = self.runner.prefill(req, req.top_row, start, end)
            pace.text_done(end - start, pace.clock() - t0)
        except Exception as e:
            outputs.append(self._fail(req, e))
            return
        req.prefilled = end
        if end == n_prompt:
            self.partial = None
            self.runner.vision_end(req)
            row = self.pool.promote(req.top_row, req.params.n)
            req.top_row = None
            for i, s in enumerate(req.seqs):
                s.row = row + i
            self.scheduler.running.extend(req.seqs)
            self._prompt_done(req, row, logits, complete, copied=True)

    def _prompt_done(self, req: Request, row: int, logits, complete: list, copied: bool = False) -> None:
        req.prefilled = len(req.prompt_token_ids)
        if not copied:
            self.pool.copy_rows([(row, row + i) for i in range(1, req.params.n)])
        self.reuse.stash(req.keys, row, len(req.keys))
        tokens = sample(logits[None].expand(req.params.n, -1), req.seqs)
        req.first_token_time = time.monotonic()
        for s, t in zip(req.seqs, tokens):
            s.append(t, self.max_model_len)
        complete.append(req)

    def stats(self) -> dict:
        return {**self.reuse.stats(), **self.runner.stats()}

    def run_until_done(self) -> list[RequestOutput]:
        finals = []
        while self.has_unfinished_requests():
            finals += [o for o in self.step() if o.finished]
        return finals

