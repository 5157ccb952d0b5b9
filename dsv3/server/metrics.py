"""Prometheus metrics at /metrics, named after vLLM's (docs/design/metrics.md) with a `dsv3:` prefix.

Counters are in requests or tokens; histograms give p50/p99 through `histogram_quantile`. Each app has its own
registry, so several servers can live in one process (the tests). Labels never carry keys or prompts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("dsv3:http_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "method", "status"], registry=r)
        self.http_latency = Histogram("dsv3:http_request_duration_seconds", "HTTP request latency by endpoint",
                                      ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("dsv3:e2e_request_latency_seconds", "Generation request latency (arrival to "
                                     "last token)", buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("dsv3:time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dsv3:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("dsv3:generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("dsv3:prompt_cached_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.success = Counter("dsv3:request_success", "Finished generations by finish reason",
                               ["finished_reason"], registry=r)
        Gauge("dsv3:num_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("dsv3:num_requests_waiting", "Requests in the waiting queue", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("dsv3:prefix_cache_usage_bytes", "Bytes of prefix-cache blocks in use", registry=r).set_function(
            lambda: engine.prefix.used_bytes)
        Gauge("dsv3:prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache",
              registry=r).set_function(lambda: engine.prefix.queried_tokens)
        Gauge("dsv3:prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache",
              registry=r).set_function(lambda: engine.prefix.hit_tokens)
        info = Gauge("dsv3:model_info", "The served model", ["model_name", "max_seq_len", "max_batch"], registry=r)
        info.labels(model_name, str(engine.max_seq_len), str(engine.config.max_batch)).set(1)

    def observe_generation(self, usage, reason: str, arrival: float, first_token: float | None, end: float) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.success.labels(reason).inc()
        self.e2e_latency.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
