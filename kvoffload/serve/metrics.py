"""``GET /metrics``: Prometheus text through ``prometheus-client``, one registry per server.

Request-level series (queue, running batch, tokens, latencies) are updated by the engine loop
as it steps; the KV store's series (bytes held and moved per tier, sparse reads, speculation)
come from a snapshot the loop takes between steps (the store is only touched on its thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class _KVCollector(Collector):
    """Exposes the last snapshot of the KV store's counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, int] = {}
        self.used: dict[str, int] = {}                      # tier -> chunks in use (tiered store)
        self.moved: dict[str, dict[str, int]] = {}          # tier -> counter -> bytes
        self.sparse: dict[str, int] = {}
        self.spec: dict[str, int] = {}

    def collect(self) -> Iterator:
        with self.lock:
            held = GaugeMetricFamily("kvoffload_kv_bytes", "KV bytes held now, per tier", labels=["tier"])
            for tier, b in self.held.items():
                held.add_metric([tier], b)
            yield held
            used = GaugeMetricFamily("kvoffload_kv_chunks_used", "KV chunks in use now, per tier (tiered store; "
                                     "a tier's memory stays allocated for reuse, so kvoffload_kv_bytes does not "
                                     "drop when sequences finish)", labels=["tier"])
            for tier, n in self.used.items():
                used.add_metric([tier], n)
            yield used
            moved = CounterMetricFamily("kvoffload_kv_traffic_bytes", "KV bytes moved, per tier and kind "
                                        "(read, written, to_worker, from_worker)", labels=["tier", "kind"])
            for tier, counts in self.moved.items():
                for kind in ("read", "written", "to_worker", "from_worker"):
                    if kind in counts:
                        moved.add_metric([tier, kind], counts[kind])
            yield moved
            sparse = CounterMetricFamily("kvoffload_sparse_tokens", "sparse decode: tokens in context, attended "
                                         "and read (block-granular), summed over sparse layer steps", labels=["kind"])
            for kind in ("context", "attended", "read"):
                if kind in self.sparse:
                    sparse.add_metric([kind], self.sparse[kind])
            yield sparse
            steps = CounterMetricFamily("kvoffload_sparse_steps", "sparse decode (sequence, layer) steps")
            if "steps" in self.sparse:
                steps.add_metric([], self.sparse["steps"])
            yield steps
            spec = CounterMetricFamily("kvoffload_spec_tokens", "self-speculation: verifications, draft tokens "
                                       "proposed and accepted, tokens emitted", labels=["kind"])
            for kind, v in self.spec.items():
                spec.add_metric([kind], v)
            yield spec


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.waiting = Gauge("kvoffload_requests_waiting", "sequences queued for the running batch", registry=r)
        self.running = Gauge("kvoffload_requests_running", "sequences in the running batch", registry=r)
        self.prompt_tokens = Counter("kvoffload_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("kvoffload_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("kvoffload_requests_finished", "sequences finished, by reason "
                                "(stop, length, abort, timeout, error)", ["reason"], registry=r)
        self.rejected = Counter("kvoffload_requests_rejected", "requests answered 429 (queue full)", registry=r)
        self.ttft = Histogram("kvoffload_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvoffload_time_per_output_token_seconds", "first to last token, per token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvoffload_request_latency_seconds", "arrival to last token", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.kv_reserved = Gauge("kvoffload_kv_chunks_reserved", "KV chunks reserved by the admitted sequences "
                                 "(admission keeps it within the tier budgets)", registry=r)
        self.kv = _KVCollector()
        r.register(self.kv)

    def snapshot_kv(self, stats, used: dict[str, int], spec_stats) -> None:
        """From the engine loop's thread: the KV store's :class:`KVStats`, chunks in use per tier
        and speculation's stats."""
        with self.kv.lock:
            self.kv.held = dict(stats.held)
            self.kv.used = dict(used)
            self.kv.moved = {t: dict(vars(c)) for t, c in stats.tiers.items()}
            sp = stats.sparse
            self.kv.sparse = {} if sp is None else {"steps": sp.steps, "context": sp.context,
                                                     "attended": sp.attended, "read": sp.read}
            self.kv.spec = {} if spec_stats is None else {
                "verifications": spec_stats.rounds, "drafted": spec_stats.drafted,
                "accepted": spec_stats.accepted, "emitted": spec_stats.emitted}
