"""Prometheus metrics of an engine process (one registry per process, no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelfleet.dataplane.common.buckets import INTER_TOKEN_BUCKETS, LATENCY_BUCKETS
from modelfleet.dataplane.runners.base import ModelRunner


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
        self.inter_token_seconds = Histogram(
            "modelfleet_engine_inter_token_latency_seconds",
            "Time between two generated tokens of one stream (a chunk of n tokens counts n gaps of 1/n)",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
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

    def observe_inter_token(self, seconds: float, tokens: int) -> None:
        """A chunk of ``tokens`` tokens arrived ``seconds`` after the previous one."""
        gap = seconds / max(tokens, 1)
        for _ in range(max(tokens, 1)):
            self.inter_token_seconds.observe(gap)


# name, kind, help: the runner's runtime_stats() keys exported at each scrape
RUNTIME_STATS: dict[str, tuple[str, str, str]] = {
    "kv_blocks_total": ("modelfleet_engine_kv_blocks", "gauge", "Paged-KV blocks of this replica"),
    "kv_blocks_used": ("modelfleet_engine_kv_blocks_used", "gauge", "Paged-KV blocks held by sequences"),
    "kv_blocks_cached": (
        "modelfleet_engine_prefix_cache_blocks",
        "gauge",
        "Blocks whose contents are in the prefix cache (held or reclaimable)",
    ),
    "prefix_queries": (
        "modelfleet_engine_prefix_cache_queried_tokens",
        "counter",
        "Prompt tokens looked up in the prefix cache",
    ),
    "prefix_hits": (
        "modelfleet_engine_prefix_cache_hit_tokens",
        "counter",
        "Prompt tokens found in the prefix cache (not computed)",
    ),
    "prefix_evictions": (
        "modelfleet_engine_prefix_cache_evictions",
        "counter",
        "Cached blocks reclaimed for new contents",
    ),
    "steps": ("modelfleet_engine_steps", "counter", "Engine steps run"),
    "prefill_tokens": ("modelfleet_engine_prefill_computed_tokens", "counter", "Prompt positions computed"),
    "step_s": ("modelfleet_engine_step_seconds", "counter", "Time in engine steps"),
    "forward_s": ("modelfleet_engine_forward_seconds", "counter", "Time in model forwards and sampling"),
    "scheduler_s": ("modelfleet_engine_scheduler_seconds", "counter", "Time in the step scheduler"),
    "drafted": ("modelfleet_engine_spec_draft_tokens", "counter", "Speculative draft tokens proposed"),
    "accepted": ("modelfleet_engine_spec_accepted_tokens", "counter", "Speculative draft tokens accepted"),
    # remote runner (runners/remote.py)
    "cost_usd": ("modelfleet_engine_cost_usd", "counter", "Estimated provider spend: usage times declared prices"),
    "spend_hour_usd": ("modelfleet_engine_spend_hour_usd", "gauge", "Estimated spend in this clock hour (UTC)"),
    "spend_day_usd": ("modelfleet_engine_spend_day_usd", "gauge", "Estimated spend in this UTC day"),
    "upstream_requests": ("modelfleet_engine_upstream_requests", "counter", "Calls to the provider, retries included"),
    "upstream_retries": ("modelfleet_engine_upstream_retries", "counter", "Provider calls that were retries"),
    "upstream_errors": ("modelfleet_engine_upstream_errors", "counter", "Requests the provider failed or refused"),
    "rate_limit_wait_s": (
        "modelfleet_engine_rate_limit_wait_seconds",
        "counter",
        "Time requests waited for the declared rate limits",
    ),
    "rate_limited": ("modelfleet_engine_rate_limited", "counter", "Requests refused: rate limits beyond max wait"),
    "budget_refusals": ("modelfleet_engine_budget_refusals", "counter", "Requests refused: spend budget used up"),
}


class RuntimeStatsCollector(Collector):
    """Reads the runner's counters at scrape time, so the step loop never touches prometheus objects."""

    def __init__(self, source: Callable[[], dict[str, float]], labels: dict[str, str] | None = None) -> None:
        self.source = source
        self.labels = labels or {}

    def collect(self) -> Iterator[Metric]:
        stats = self.source()
        for key, (name, kind, text) in RUNTIME_STATS.items():
            if key not in stats:
                continue
            names = list(self.labels)
            family = (
                CounterMetricFamily(name, text, labels=names)
                if kind == "counter"
                else GaugeMetricFamily(name, text, labels=names)
            )
            family.add_metric(list(self.labels.values()), float(stats[key]))
            yield family


def watch_runner(metrics: EngineMetrics, runner: ModelRunner, *, tier: str = "local") -> None:
    """Export the runner's runtime_stats() (every runner has them), labelled with the tier the engine
    serves (``local``, or a spill-over tier's name), so spend adds up per tier."""
    metrics.registry.register(RuntimeStatsCollector(runner.runtime_stats, {"tier": tier}))


class ModelServerCollector(Collector):
    """The model-server metrics protocol that Kubernetes inference routers scrape (the Gateway API
    Inference Extension's endpoint picker, llm-d's router): vLLM's metric names, computed from this
    engine's own queue and KV cache at scrape time, so a router written for vLLM reads a torch engine
    the same way.

    ``vllm:num_requests_waiting`` / ``vllm:num_requests_running`` (gauges), ``vllm:kv_cache_usage_perc``
    (gauge, a fraction 0..1 as in vLLM), ``vllm:cache_config_info`` (gauge 1 with ``block_size`` and
    ``num_gpu_blocks`` labels). The KV families appear only for runners with a paged cache.
    """

    def __init__(
        self, load: Callable[[], dict[str, int | float]], stats: Callable[[], dict[str, float]], model_name: str
    ) -> None:
        self.load = load
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        load = self.load()
        labels = ["model_name"]
        for name, key, text in (
            ("vllm:num_requests_waiting", "queued", "Requests waiting to be admitted"),
            ("vllm:num_requests_running", "running", "Requests holding a decode slot"),
        ):
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric([self.model_name], float(load[key]))
            yield family
        stats = self.stats()
        total = stats.get("kv_blocks_total")
        if not total:
            return
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full)", labels=labels)
        usage.add_metric([self.model_name], float(stats.get("kv_blocks_used", 0.0)) / float(total))
        yield usage
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "KV-cache configuration", labels=[*labels, "block_size", "num_gpu_blocks"]
        )
        info.add_metric([self.model_name, str(int(stats.get("kv_block_size", 0))), str(int(total))], 1.0)
        yield info
