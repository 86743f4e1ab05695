"""Process entry point of a coordinator sidecar."""

from __future__ import annotations

import asyncio
from pathlib import Path

from modelfleet.dataplane.httpserver import serve
from modelfleet.dataplane.manifest import ManifestError, load_manifests
from modelfleet.dataplane.settings import SidecarSettings
from modelfleet.dataplane.sidecar.api import build_app
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.routing import make_policy
from modelfleet.dataplane.sidecar.service import Coordinator
from modelfleet.dataplane.spec import RoutingSpec


def manifest_routing(path: Path, deployment: str) -> RoutingSpec:
    """The ``spec.routing`` section of one deployment in a manifest (defaults where it has none)."""
    for dep in load_manifests(path):
        if dep.metadata.name == deployment:
            return dep.spec.routing
    raise ManifestError(f"{path} has no deployment named {deployment!r}")


def run(settings: SidecarSettings, routing: RoutingSpec | None = None) -> None:
    """``routing``: the manifest's section, whose policy ``settings.policy`` replaces when they differ."""
    if routing is None:
        routing = RoutingSpec(policy=settings.policy)
    elif routing.policy is not settings.policy:
        routing = routing.model_copy(update={"policy": settings.policy})
    coord = Coordinator(
        settings.deployment,
        settings.peers,
        make_policy(routing),
        SidecarMetrics(),
        retry_budget=settings.retry_budget,
    )
    asyncio.run(serve(build_app(coord), settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))
