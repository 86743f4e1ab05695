"""Prometheus metrics of an engine process (one registry per process, no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "modelfleet_engine_requests_total", "Requests finished by the engine", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "modelfleet_engine_rejected_total",
            "Requests refused because the queue was full (reason: queue_len or queue_tokens)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("modelfleet_engine_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("modelfleet_engine_generation_tokens_total", "Tokens generated", registry=r)
        self.queued_tokens = Gauge(
            "modelfleet_engine_queued_tokens", "Prompt plus max_tokens of the requests waiting", registry=r
        )
        self.queued = Gauge("modelfleet_engine_queued_requests", "Requests waiting for a decode slot", registry=r)
        self.running = Gauge("modelfleet_engine_running_requests", "Sequences holding a decode slot", registry=r)
        self.queue_seconds = Histogram(
            "modelfleet_engine_queue_seconds", "Time from arrival to admission", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft_seconds = Histogram(
            "modelfleet_engine_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "modelfleet_engine_request_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        # supervision of the runner (dataplane/engine/worker.py)
        self.context_faults = Counter(
            "modelfleet_engine_context_faults_total", "Device context (or session) faults of the runner", registry=r
        )
        self.rebuilds = Counter(
            "modelfleet_engine_rebuilds_total",
            "Runner session rebuilds by cause and outcome (ok, failed)",
            ["cause", "outcome"],
            registry=r,
        )
        self.resumed = Counter(
            "modelfleet_engine_resumed_sequences_total", "Sequences resubmitted after a context fault", registry=r
        )
        self.retriable_failures = Counter(
            "modelfleet_engine_retriable_failures_total",
            "Requests ended with a retriable engine_rebuilding error",
            registry=r,
        )
        self.rebuilding = Gauge(
            "modelfleet_engine_rebuilding", "1 while the runner session is being rebuilt (or backing off)", registry=r
        )
