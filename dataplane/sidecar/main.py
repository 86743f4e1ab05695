"""Process entry point of a coordinator sidecar."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

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
    app = build_app(coord)
    if settings.kubernetes:
        app.cleanup_ctx.append(_discovery(coord, settings))  # after build_app's: the coordinator's session is open
    asyncio.run(serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))


def _discovery(coord: Coordinator, settings: SidecarSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cluster mode: peers from the EndpointSlices of ``settings.service`` (sidecar/discovery.py)."""
    from modelfleet.dataplane.sidecar.discovery import PeerDiscovery, default_namespace, endpoint_slice_lister

    service = settings.service
    assert service, "cluster mode needs the headless Service's name"
    namespace = settings.namespace or default_namespace()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        lister = await asyncio.to_thread(endpoint_slice_lister, service, namespace)
        discovery = PeerDiscovery(
            coord,
            lister,
            service=f"{namespace}/{service}",
            port_name=settings.engine_port_name,
            default_port=settings.engine_port,
            interval_s=settings.discovery_interval_s,
        )
        task = asyncio.create_task(discovery.run_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
