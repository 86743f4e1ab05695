"""Prometheus metrics of a coordinator sidecar."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter(
            "modelfleet_sidecar_routed_total", "Requests sent to a replica", ["peer_index"], registry=r
        )
        self.retries = Counter(
            "modelfleet_sidecar_retries_total", "Unstarted requests retried on another replica", ["reason"], registry=r
        )
        self.failures = Counter(
            "modelfleet_sidecar_failures_total", "Requests that failed at the sidecar", ["kind"], registry=r
        )
        self.healthy_peers = Gauge(
            "modelfleet_sidecar_healthy_peers", "Replicas currently considered healthy", registry=r
        )
