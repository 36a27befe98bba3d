"""Prometheus metrics (--enable-metrics): request and token counters, TTFT/ITL/E2E histograms, and
engine gauges (running/queued, KV usage, prefix-cache hit rate) read at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("radixserve_requests", "finished sequences", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("radixserve_prompt_tokens", "prompt tokens of finished sequences", registry=r)
        self.cached_tokens = Counter("radixserve_cached_prompt_tokens", "prompt tokens reused from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("radixserve_generation_tokens", "generated tokens", registry=r)
        self.embeddings = Counter("radixserve_embedding_inputs", "texts embedded", registry=r)
        self.ttft = Histogram("radixserve_time_to_first_token_seconds", "time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("radixserve_inter_token_latency_seconds", "time between tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("radixserve_e2e_request_latency_seconds", "submit to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("radixserve_num_running_requests", "sequences in the running batch", registry=r)
        self.queued = Gauge("radixserve_num_queued_requests", "sequences waiting for the batch", registry=r)
        self.kv_usage = Gauge("radixserve_kv_cache_usage_ratio", "KV slots held by running sequences", registry=r)
        self.kv_cached = Gauge("radixserve_kv_cache_cached_tokens", "KV slots held by the prefix cache", registry=r)
        self.hit_rate = Gauge("radixserve_prefix_cache_hit_rate", "cached / prompt tokens since start", registry=r)
        self._prompt_total = self._cached_total = 0

    # Called by the TokenizerManager as tokens arrive.
    def on_token(self, first: bool, latency: float) -> None:
        (self.ttft if first else self.itl).observe(latency)
        self.generation_tokens.inc()

    def on_finish(self, reason: str, prompt_tokens: int, cached_tokens: int, e2e: float) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens
        self.e2e.observe(e2e)

    def on_embedding(self, prompt_tokens: int, cached_tokens: int, e2e: float) -> None:
        self.embeddings.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens
        self.e2e.observe(e2e)

    async def render(self, tokenizer_manager) -> bytes:
        stats = await tokenizer_manager.stats()
        self.running.set(stats.num_running)
        self.queued.set(stats.num_waiting)
        self.kv_usage.set((stats.kv_total - stats.kv_free - stats.kv_cached) / max(stats.kv_total, 1))
        self.kv_cached.set(stats.kv_cached)
        self.hit_rate.set(self._cached_total / self._prompt_total if self._prompt_total else 0.0)
        return generate_latest(self.registry)
