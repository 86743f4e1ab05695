"""Process entry point of an engine replica."""

from __future__ import annotations

import asyncio
import logging

from modelfleet.dataplane.engine.api import EngineState, build_app
from modelfleet.dataplane.engine.config_watch import config_watch
from modelfleet.dataplane.engine.faults import FaultInjector
from modelfleet.dataplane.engine.metrics import EngineMetrics, watch_runner
from modelfleet.dataplane.httpserver import serve
from modelfleet.dataplane.manifest import ManifestError, load_manifests
from modelfleet.dataplane.runners.registry import create_runner
from modelfleet.dataplane.runners.remote import RemoteRunner
from modelfleet.dataplane.settings import EngineSettings
from modelfleet.dataplane.spec import InferenceDeployment, InferenceDeploymentSpec

log = logging.getLogger(__name__)


def select_deployment(settings: EngineSettings) -> InferenceDeployment:
    deployments = load_manifests(settings.manifest)
    if settings.deployment is None:
        if len(deployments) != 1:
            raise ManifestError(f"{settings.manifest} holds {len(deployments)} deployments; pass --deployment")
        return deployments[0]
    for dep in deployments:
        if dep.metadata.name == settings.deployment:
            return dep
    raise ManifestError(f"{settings.manifest} has no deployment named {settings.deployment!r}")


def engine_spec(settings: EngineSettings) -> InferenceDeploymentSpec:
    """The spec this engine runs: its deployment's, or, for a spill-over tier, that tier's hosted API."""
    dep = select_deployment(settings)
    try:
        return dep.spec.for_tier(settings.tier) if settings.tier else dep.spec
    except ValueError as exc:
        raise ManifestError(f"{settings.manifest}: {exc}") from None


def run(settings: EngineSettings) -> None:
    dep = select_deployment(settings)
    spec = engine_spec(settings)
    runner = create_runner(spec)
    injector = FaultInjector() if settings.fault_injection else None
    if injector is not None:
        log.warning("fault injection is on (MODELFLEET_FAULT_INJECTION): POST /admin/fault poisons the runner")
    metrics = EngineMetrics()
    watch_runner(metrics, runner, tier=settings.tier or "local")
    state = EngineState(spec, runner, metrics, fault_injector=injector)
    app = build_app(state)
    if isinstance(runner, RemoteRunner):  # it can take a changed spec without a restart
        app.cleanup_ctx.append(config_watch(settings.manifest, lambda: engine_spec(settings), runner, metrics))
    what = f"tier {settings.tier}" if settings.tier else str(settings.replica)
    log.info("engine %s/%s listening on %s:%d", dep.metadata.name, what, settings.host, settings.port)

    def drain() -> None:  # SIGTERM: /health (SGLang's probe) and the handlers refuse new work too
        state.draining = True

    asyncio.run(serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s, on_drain=drain))
