"""`GET /metrics` in the Prometheus text format (prometheus-client), one registry per app.

Counters: responses by HTTP status, prompt / generated tokens, prefix-cache queries / hits / prompt tokens served
from it, vision-cache hits / misses (read from the engine when scraped). Gauges (read when scraped): requests
running and waiting in the engine, in each pre-engine stage, KV-cache rows in use, bytes held by the two caches.
Histograms: time to first token, inter-token latency, end-to-end latency, vision encoder time (forward hooks on the
model's vision tower, which runs on the processing threads and the step thread; timed per thread;
prometheus-client is thread-safe).
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine, stages):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qwen2vl_http_requests", "HTTP responses by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("qwen2vl_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("qwen2vl_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("qwen2vl_time_to_first_token_seconds", "Body accepted to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("qwen2vl_inter_token_latency_seconds", "Time between output tokens", buckets=_LATENCY,
                             registry=r)
        self.e2e = Histogram("qwen2vl_e2e_request_latency_seconds", "Body accepted to last token", buckets=_LATENCY,
                             registry=r)
        self.vision = Histogram("qwen2vl_vision_encoder_seconds", "Vision encoder forward time", buckets=_LATENCY,
                                registry=r)
        eng = engine.engine

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, registry=r).set_function(fn)

        gauge("qwen2vl_num_requests_running", "Requests decoding in the engine", lambda: engine.stats()["running"])
        gauge("qwen2vl_num_requests_waiting", "Requests queued in the engine", lambda: engine.stats()["waiting"])
        for stage in stages.names:
            gauge(f"qwen2vl_num_requests_{stage}", f"Requests {stage}", lambda s=stage: stages.counts[s])
        pool = eng.pool
        gauge("qwen2vl_kv_cache_usage_ratio", "KV-cache rows in use / rows",
              lambda: 1 - pool.num_free / max(pool.max_num_seqs, 1))
        r.register(_CacheCollector(eng))
        self._hook_vision(getattr(eng.model, "visual", None) or getattr(getattr(eng.model, "model", None), "visual",
                                                                           None))

    def _hook_vision(self, visual) -> None:
        if visual is None:
            return
        started = threading.local()  # the tower may run on several threads at once
        visual.register_forward_pre_hook(lambda *a: setattr(started, "t", time.perf_counter()))

        def done(*a):
            t = getattr(started, "t", None)
            if t is not None:
                self.vision.observe(time.perf_counter() - t)
                started.t = None

        visual.register_forward_hook(done)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The engine's prefix / vision cache statistics, read when scraped."""

    _COUNTERS = (("prefix_cache_queries", "Prompts looked up in the KV prefix cache"),
                 ("prefix_cache_hits", "Prompts that reused cached KV"),
                 ("prefix_cache_cached_tokens", "Prompt tokens served from the KV prefix cache (not prefilled)"),
                 ("vision_cache_hits", "Pictures/videos whose vision features came from the vision cache"),
                 ("vision_cache_misses", "Pictures/videos run through the vision tower"))
    _GAUGES = (("prefix_cache_bytes", "Bytes of KV held by the prefix cache"),
               ("vision_cache_bytes", "Bytes of vision features held by the vision cache"))

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, doc in self._COUNTERS:
            if key in stats:
                yield CounterMetricFamily(f"qwen2vl_{key}", doc, value=stats[key])
        for key, doc in self._GAUGES:
            if key in stats:
                yield GaugeMetricFamily(f"qwen2vl_{key}", doc, value=stats[key])


class RequestClock:
    """Per-request latency bookkeeping: `token(n)` for each output event carrying `n` new tokens."""

    def __init__(self, metrics: Metrics | None, start: float):
        self.metrics, self.start, self.last, self.tokens = metrics, start, None, 0

    def token(self, n: int) -> None:
        if self.metrics is None or n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        self.last = now
        self.tokens += n

    def finish(self, n_prompt: int) -> None:
        if self.metrics is None:
            return
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.metrics.prompt_tokens.inc(n_prompt)
        self.metrics.generation_tokens.inc(self.tokens)
