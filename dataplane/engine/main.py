"""Process entry point of an engine replica."""

from __future__ import annotations

import asyncio
import logging

from modelfleet.dataplane.engine.api import EngineState, build_app
from modelfleet.dataplane.engine.faults import FaultInjector
from modelfleet.dataplane.engine.metrics import EngineMetrics, watch_runner
from modelfleet.dataplane.httpserver import serve
from modelfleet.dataplane.manifest import ManifestError, load_manifests
from modelfleet.dataplane.runners.registry import create_runner
from modelfleet.dataplane.settings import EngineSettings

log = logging.getLogger(__name__)


def select_deployment(settings: EngineSettings):  # type: ignore[no-untyped-def]
    deployments = load_manifests(settings.manifest)
    if settings.deployment is None:
        if len(deployments) != 1:
            raise ManifestError(f"{settings.manifest} holds {len(deployments)} deployments; pass --deployment")
        return deployments[0]
    for dep in deployments:
        if dep.metadata.name == settings.deployment:
            return dep
    raise ManifestError(f"{settings.manifest} has no deployment named {settings.deployment!r}")


def run(settings: EngineSettings) -> None:
    dep = select_deployment(settings)
    runner = create_runner(dep.spec)
    injector = FaultInjector() if settings.fault_injection else None
    if injector is not None:
        log.warning("fault injection is on (MODELFLEET_FAULT_INJECTION): POST /admin/fault poisons the runner")
    metrics = EngineMetrics()
    watch_runner(metrics, runner)
    state = EngineState(dep.spec, runner, metrics, fault_injector=injector)
    app = build_app(state)
    log.info("engine %s/%d listening on %s:%d", dep.metadata.name, settings.replica, settings.host, settings.port)
    asyncio.run(serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))
