"""Prometheus metrics of the gateway. Labels come from fixed sets: the
deployment label is a configured deployment name, never a client's string."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from modelfleet.dataplane.common.buckets import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "modelfleet_gateway_requests_total",
            "Requests answered by the gateway",
            ["deployment", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "modelfleet_gateway_request_seconds",
            "Request latency to the last byte",
            ["deployment", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "modelfleet_gateway_time_to_first_token_seconds",
            "Time to the first streamed token",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "modelfleet_gateway_prompt_tokens_total", "Prompt tokens of answered requests", ["deployment"], registry=r
        )
        self.completion_tokens = Counter(
            "modelfleet_gateway_completion_tokens_total",
            "Generated tokens of answered requests",
            ["deployment"],
            registry=r,
        )
        # API keys (gateway/auth.py): the key label is a key's name from the keys file, never the key
        self.auth_refused = Counter(
            "modelfleet_gateway_auth_refused_total",
            "Requests refused by authentication, authorization or a per-key limit",
            ["reason", "key"],
            registry=r,
        )
        self.key_requests = Counter(
            "modelfleet_gateway_key_requests_total", "Admitted requests per API key", ["key", "status"], registry=r
        )
        self.key_prompt_tokens = Counter(
            "modelfleet_gateway_key_prompt_tokens_total", "Prompt tokens per API key", ["key"], registry=r
        )
        self.key_completion_tokens = Counter(
            "modelfleet_gateway_key_completion_tokens_total", "Generated tokens per API key", ["key"], registry=r
        )
