"""Requests, sequences and their outputs.

A `Request` holds one prompt (token ids + optional vision inputs) and `n` `Sequence`s that share it: the prompt is
prefilled once into one KV row and that row is copied for the other n-1 sequences.
`RequestOutput` is what callers see: cumulative text / token ids per completion plus the delta since the
previous output of the same request (for streaming).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams


class EngineError(Exception):
    """Base class of errors reported to the caller of a request."""


class RequestRejected(EngineError, ValueError):
    """A request that can never be served (too long, too many sequences, bad inputs): HTTP 400."""


class QueueFull(EngineError):
    """The waiting queue is at its limit: HTTP 429."""


class EngineDead(EngineError):
    """The engine was shut down (or its loop crashed): HTTP 503."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class MultiModalInputs:
    """Processor outputs for one prompt. pixel_values (N, C*T*p*p); image_grid_thw (n, 3); videos likewise."""

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    image_hashes: tuple[str, ...] = ()  # content hash per picture / video (vision_cache.media_hashes)
    video_hashes: tuple[str, ...] = ()

    def hashes(self) -> dict:
        return {"image": self.image_hashes, "video": self.video_hashes}

    def tensors(self) -> dict:
        """The vision tensors that are set, as forward keyword arguments (on the CPU, as processed)."""
        return {name: getattr(self, name) for name in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                       "video_grid_thw") if getattr(self, name) is not None}


class Sequence:
    """One completion being generated. `row` is its KV-cache row while running (None otherwise)."""

    def __init__(self, request: "Request", index: int, generator: torch.Generator | None):
        self.request = request
        self.index = index
        self.output_ids: list[int] = []
        self.row: int | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.generator = generator
        self.guide = None  # a qwen2vl.guided_decoding.Guide when the request is constrained
        self.logprobs: list | None = [] if request.params.logprobs is not None else None  # engine/logprobs.py
        self.detok = IncrementalDetokenizer(request.tokenizer, request.prompt_token_ids, request.params)
        self._sent_tokens = 0
        self._sent_text = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_token_ids[-1]

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    def append(self, token: int, max_model_len: int) -> None:
        """Record one sampled token and decide whether the sequence is finished."""
        p = self.request.params
        self.output_ids.append(token)
        n = len(self.output_ids)
        stop_ids = p.stop_token_ids
        is_eos = token in self.request.eos_ids and not p.ignore_eos
        if n >= p.min_tokens and (is_eos or token in stop_ids):
            if p.include_stop_str_in_output and not is_eos:
                self.detok.add(token, check_stop=False)
            self._finish("stop", None if is_eos else token)
            return
        hit = self.detok.add(token, check_stop=n >= p.min_tokens)
        if hit is not None:
            self._finish("stop", hit)
        elif (p.max_tokens is not None and n >= p.max_tokens) or self.total_len >= max_model_len:
            self._finish("length", None)

    def _finish(self, reason: str, stop_reason) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.detok.finish()

    def abort(self) -> None:
        if not self.finished:
            self._finish("abort", None)

    def completion(self, delta: bool = True) -> "CompletionOutput":
        text = self.detok.visible_text(final=self.finished)
        out = CompletionOutput(index=self.index, text=text, token_ids=list(self.output_ids),
                               finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                               delta_text=text[self._sent_text:], delta_token_ids=self.output_ids[self._sent_tokens:],
                               logprobs=None if self.logprobs is None else list(self.logprobs),
                               delta_logprobs=None if self.logprobs is None else self.logprobs[self._sent_tokens:])
        if delta:
            self._sent_text, self._sent_tokens = len(text), len(self.output_ids)
        return out


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 mm: MultiModalInputs | None = None, prompt: Any = None, tokenizer=None, device="cpu",
                 eos_ids: frozenset[int] = frozenset(), arrival: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.mm = mm or MultiModalInputs()
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.status = Status.WAITING
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.error: BaseException | None = None
        self.num_cached_tokens = 0
        self.keys: list = []  # prefix-cache keys of the prompt (set by the engine)
        self.vision_pending = False  # chunked prefill: its pictures are being encoded, a slice per step
        self.adapter = -1  # index of its served LoRA adapter (-1: the base model)
        self.prefilled = 0    # prompt tokens in the KV row so far (chunked prefill)
        gens: list[torch.Generator | None] = [None] * params.n
        if not params.greedy:
            base = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            seeds = (torch.randint(0, 2**62, (params.n,), generator=base).tolist() if base is not None
                     else [int(torch.randint(0, 2**62, (1,)).item()) for _ in range(params.n)])
            gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.seqs = [Sequence(self, i, gens[i]) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self, delta: bool = True) -> "RequestOutput":
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids,
                             outputs=[s.completion(delta) for s in self.seqs], finished=self.finished,
                             metrics=RequestMetrics(self.arrival, self.first_token_time, self.finish_time),
                             error=self.error, num_cached_tokens=self.num_cached_tokens)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string / stop token id that ended it (None for EOS)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # one engine.logprobs.TokenLogprob per token when SamplingParams.logprobs is set
    delta_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Any
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: BaseException | None = None  # set when the request failed inside the engine
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
