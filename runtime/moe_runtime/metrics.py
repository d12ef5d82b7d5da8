"""Prometheus metrics of the runtime: requests, tokens, latencies, batch, per-expert load, placement.

One `RuntimeMetrics` per server, on its own registry (tests run several servers in one process).
Label sets are bounded: status codes, layer and expert ids; never request ids.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _ExpertLoadCollector:
    """Reads the cumulative per-(layer, expert) counters from the engine at scrape time."""

    def __init__(self, read_load: Callable[[], list[list[int]]], read_version: Callable[[], int]):
        self._read_load, self._read_version = read_load, read_version

    def collect(self):
        tokens = CounterMetricFamily(
            "moe_runtime_expert_tokens", "Token-slots routed to each expert slot (cumulative).",
            labels=["layer", "expert"],
        )
        for layer, row in enumerate(self._read_load()):
            for expert, count in enumerate(row):
                tokens.add_metric([str(layer), str(expert)], float(count))
        yield tokens
        version = GaugeMetricFamily("moe_runtime_placement_version", "Version of the expert placement in use.")
        version.add_metric([], float(self._read_version()))
        yield version


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moe_runtime_requests", "Requests finished, by gRPC status code.",
                                ["code"], registry=r)
        self.prompt_tokens = Counter("moe_runtime_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("moe_runtime_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("moe_runtime_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moe_runtime_inter_token_latency_seconds", "Time between a request's tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("moe_runtime_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("moe_runtime_running_sequences", "Sequences in the running batch.", registry=r)
        self.cache_hits = Counter("moe_runtime_expert_cache_hits", "Expert buffer hits.", registry=r)
        self.cache_misses = Counter("moe_runtime_expert_cache_misses", "Expert buffer misses.", registry=r)
        self.cache_copied = Counter("moe_runtime_expert_cache_copied_bytes",
                                    "Expert weights copied host to device (misses and prefetch).", registry=r)
        self.cache_stall = Counter("moe_runtime_expert_cache_stall_seconds",
                                   "Compute time spent waiting for expert copies.", registry=r)
        self._cache_seen = (0, 0, 0, 0.0)  # hits, misses, bytes, stall seconds already counted

    def observe_expert_cache(self, hits: int, misses: int, copied_bytes: int, stall_seconds: float) -> None:
        """Advance the expert-cache counters to the engine's cumulative totals (called after each step)."""
        now = (hits, misses, copied_bytes, stall_seconds)
        counters = (self.cache_hits, self.cache_misses, self.cache_copied, self.cache_stall)
        for counter, total, seen in zip(counters, now, self._cache_seen):
            if total > seen:
                counter.inc(total - seen)
        self._cache_seen = now

    def watch_experts(self, read_load: Callable[[], list[list[int]]], read_version: Callable[[], int]) -> None:
        self.registry.register(_ExpertLoadCollector(read_load, read_version))
