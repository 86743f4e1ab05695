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
from modelfleet.dataplane.sidecar.discovery import endpoint_url
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.rollout import RolloutTraffic
from modelfleet.dataplane.sidecar.routing import PrefixAffinity, make_policy
from modelfleet.dataplane.sidecar.service import Coordinator
from modelfleet.dataplane.sidecar.tiers import Spillover, parse_tier_arg
from modelfleet.dataplane.spec import InferenceDeploymentSpec, RoutingSpec, SpilloverSpec


def _manifest_spec(path: Path, deployment: str) -> InferenceDeploymentSpec:
    for dep in load_manifests(path):
        if dep.metadata.name == deployment:
            return dep.spec
    raise ManifestError(f"{path} has no deployment named {deployment!r}")


def manifest_routing(path: Path, deployment: str) -> RoutingSpec:
    """The ``spec.routing`` section of one deployment in a manifest (defaults where it has none)."""
    return _manifest_spec(path, deployment).routing


def manifest_spillover(path: Path, deployment: str) -> SpilloverSpec | None:
    """The ``spec.spillover`` section of one deployment in a manifest, if it has one."""
    return _manifest_spec(path, deployment).spillover


def run(settings: SidecarSettings, routing: RoutingSpec | None = None, spillover: SpilloverSpec | None = None) -> None:
    """``routing``: the manifest's section, whose policy ``settings.policy`` replaces when they differ."""
    if routing is None:
        routing = RoutingSpec(policy=settings.policy)
    elif routing.policy is not settings.policy:
        routing = routing.model_copy(update={"policy": settings.policy})
    policy = make_policy(routing)
    local = settings.local_peer
    if local is None and settings.kubernetes and settings.pod_ip and settings.engine_port:
        local = endpoint_url(settings.pod_ip, settings.engine_port)
    if isinstance(policy, PrefixAffinity) and local:
        policy.local_peer = local.rstrip("/")
    coord = Coordinator(
        settings.deployment,
        settings.peers,
        policy,
        SidecarMetrics(),
        retry_budget=settings.retry_budget,
        spillover=_spillover(settings, spillover),
    )
    rollout = RolloutTraffic(settings.rollout_file) if settings.rollout_file is not None else None
    app = build_app(coord, rollout)
    if settings.kubernetes:
        app.cleanup_ctx.append(_discovery(coord, settings))  # after build_app's: the coordinator's session is open
    asyncio.run(serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))


def _spillover(settings: SidecarSettings, spec: SpilloverSpec | None) -> Spillover | None:
    if not settings.tiers or spec is None:
        return None
    tiers = [parse_tier_arg(arg) for arg in settings.tiers]
    known = {t.name for t in spec.tiers}
    unknown = [name for name, _ in tiers if name not in known]
    if unknown:
        raise ManifestError(f"--tier {unknown[0]}: not a tier of spec.spillover ({', '.join(sorted(known))})")
    return Spillover(tiers, spec.when)


def _discovery(coord: Coordinator, settings: SidecarSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Cluster mode: peers from the EndpointSlices of ``settings.service`` (sidecar/discovery.py)."""
    from modelfleet.dataplane.sidecar.discovery import (
        EndpointSliceWatcher,
        PeerDiscovery,
        api_access,
        default_namespace,
        endpoint_slice_lister,
    )

    service = settings.service
    assert service, "cluster mode needs the headless Service's name"
    namespace = settings.namespace or default_namespace()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        lister = await asyncio.to_thread(endpoint_slice_lister, service, namespace)  # the polling fallback
        access = await asyncio.to_thread(api_access)
        watcher = EndpointSliceWatcher(access, namespace, service, settings.discovery_watch_timeout_s)
        discovery = PeerDiscovery(
            coord,
            lister,
            service=f"{namespace}/{service}",
            port_name=settings.engine_port_name,
            default_port=settings.engine_port,
            interval_s=settings.discovery_interval_s,
            watcher=watcher,
        )
        task = asyncio.create_task(discovery.run_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
