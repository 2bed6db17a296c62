"""Prometheus metrics of the server, named in vLLM's shape with the `xlrt:` prefix.

Latency histograms and token counters are updated by the engine thread as requests progress;
the gauges (running, waiting, KV pages, compilations) are read at scrape time from the engine
loop's latest snapshot, so a scrape never touches the engine itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

# Buckets as vLLM uses them (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """One registry per server (tests run several servers in one process)."""

    def __init__(self, model_name: str, snapshot):
        """snapshot: a callable returning the engine loop's latest stats dict."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        r = self.registry
        self.ttft = Histogram("xlrt:time_to_first_token_seconds",
                              "Time from request arrival to its first token", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("xlrt:time_per_output_token_seconds",
                              "Per request: (e2e - ttft) / (output tokens - 1)", labels,
                              buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("xlrt:inter_token_latency_seconds",
                             "Gap between successive tokens of a request (a device call's "
                             "tokens share its gap)", labels,
                             buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("xlrt:e2e_request_latency_seconds",
                             "Time from request arrival to its last token", labels,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("xlrt:prompt_tokens", "Prompt tokens of started requests",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("xlrt:generation_tokens", "Generated tokens", labels,
                                         registry=r).labels(model_name)
        self.request_success = Counter("xlrt:request_success",
                                       "Finished requests by finish reason",
                                       labels + ["finished_reason"], registry=r)
        self.http_errors = Counter("xlrt:http_request_errors",
                                   "Requests answered with an error, by status code",
                                   labels + ["status"], registry=r)
        r.register(_SnapshotCollector(model_name, snapshot))
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.

    def finished(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector:
    """Gauges and engine-side counters read from the engine loop's snapshot at scrape time."""

    def __init__(self, model_name: str, snapshot):
        self.model_name = model_name
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        gauges = [
            ("xlrt:num_requests_running", "Requests in the engine's running batch", "running"),
            ("xlrt:num_requests_waiting", "Requests waiting for admission", "waiting"),
            ("xlrt:kv_pages_in_use", "KV cache pages held by requests", "kv_pages_in_use"),
            ("xlrt:kv_pages_total", "KV cache pages in the cache", "kv_pages_total"),
            ("xlrt:kv_cache_usage_perc", "Fraction of KV cache pages in use (0..1)",
             "kv_cache_usage"),
            ("xlrt:kv_pages_cached", "Free KV cache pages still holding a reusable prefix",
             "kv_pages_cached"),
        ]
        for name, doc, key in gauges:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], s[key])
            yield g
        counters = [
            ("xlrt:compilations", "XLA compile requests since the server started",
             "compilations_since_start"),
            ("xlrt:num_preemptions", "Requests preempted (pages freed, recomputed later)",
             "num_preemptions"),
            ("xlrt:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             "prefix_cache_queries"),
            ("xlrt:prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)",
             "prefix_cache_hits"),
        ]
        for name, doc, key in counters:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], s[key])
            yield c
