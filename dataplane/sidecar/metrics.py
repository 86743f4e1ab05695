"""Prometheus metrics of a coordinator sidecar."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter(
            "modelfleet_sidecar_routed_total",
            "Requests sent to a replica, by policy and by why the policy chose it "
            "(owner, remembered, overflow, failover, no_key, no_session, least_loaded, sampled, turn)",
            ["policy", "peer_index", "reason"],
            registry=r,
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
        self.ejections = Counter(
            "modelfleet_sidecar_ejections_total",
            "Replicas taken out of routing, by cause (not_ready, health_check, connect)",
            ["peer_index", "cause"],
            registry=r,
        )
        self.readmissions = Counter(
            "modelfleet_sidecar_readmissions_total",
            "Ejected replicas that passed a health check again",
            ["peer_index"],
            registry=r,
        )
        self.peer_load = Gauge(
            "modelfleet_sidecar_peer_load",
            "Requests in flight at a replica, as the sidecar sees it",
            ["peer_index"],
            registry=r,
        )
        self.peer_queued = Gauge(
            "modelfleet_sidecar_peer_queued", "Requests waiting at a replica (its /load)", ["peer_index"], registry=r
        )
        self.peer_kv_usage = Gauge(
            "modelfleet_sidecar_peer_kv_usage",
            "Fraction of a replica's KV blocks in use (its /load)",
            ["peer_index"],
            registry=r,
        )
        self.rollout_requests = Counter(
            "modelfleet_sidecar_rollout_requests_total",
            "Requests under a rollout plan, by side (baseline, candidate) and role (served, mirror)",
            ["side", "role"],
            registry=r,
        )
        self.rollout_mirror_dropped = Counter(
            "modelfleet_sidecar_rollout_mirror_dropped_total",
            "Mirrors not sent because the sidecar had MAX_MIRRORS in flight",
            registry=r,
        )
        self.tier_requests = Counter(
            "modelfleet_sidecar_spilled_total",
            "Requests sent to a spill-over tier instead of a local replica, by tier",
            ["tier"],
            registry=r,
        )
        self.prefix_table_entries = Gauge(
            "modelfleet_sidecar_prefix_table_entries", "Prompt prefixes the PrefixAffinity table remembers", registry=r
        )
