"""Applying a changed spec without a restart, for runners that can (the remote runner).

The engine's manifest is a file: locally the one ``modelfleet up`` was given,
in a cluster the operator's ConfigMap mounted as a volume, which the kubelet
updates in place when the InferenceDeployment changes. Every
``interval_s`` the watcher compares the file's modification time and size; on a
change it parses the file again and, when the part the runner depends on
(``runtime.remote``) differs, calls ``runner.reconfigure(spec)``: new
endpoint, key source, headers, limits or prices, with the spend so far kept,
and a rebuilt session (cause remote_config_change, counted in
``modelfleet_engine_rebuilds_total``). A file that does not parse is logged
and ignored: the running configuration stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from modelfleet.dataplane.engine.metrics import EngineMetrics
from modelfleet.dataplane.manifest import ManifestError
from modelfleet.dataplane.runners.base import SessionRebuildCause
from modelfleet.dataplane.spec import InferenceDeploymentSpec

log = logging.getLogger(__name__)


class Reconfigurable(Protocol):
    spec: InferenceDeploymentSpec

    async def reconfigure(self, spec: InferenceDeploymentSpec) -> None: ...


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size


async def watch(
    path: Path,
    load: Callable[[], InferenceDeploymentSpec],
    runner: Reconfigurable,
    metrics: EngineMetrics,
    interval_s: float = 2.0,
) -> None:
    cause = SessionRebuildCause.REMOTE_CONFIG_CHANGE.value
    seen = _stamp(path)
    while True:
        await asyncio.sleep(interval_s)
        stamp = _stamp(path)
        if stamp is None or stamp == seen:
            continue
        seen = stamp
        try:
            spec = await asyncio.to_thread(load)
        except (ManifestError, ValueError, OSError) as exc:
            log.error("the changed manifest %s is not applied: %s", path, exc)
            continue
        if spec.runtime.remote == runner.spec.runtime.remote:
            continue
        try:
            await runner.reconfigure(spec)
        except Exception as exc:
            log.error("applying the changed runtime.remote failed: %s: %s", type(exc).__name__, exc)
            metrics.rebuilds.labels(cause=cause, outcome="failed").inc()
            continue
        metrics.rebuilds.labels(cause=cause, outcome="ok").inc()
        log.warning("runtime.remote changed in %s: applied without a restart", path)


def config_watch(
    path: Path, load: Callable[[], InferenceDeploymentSpec], runner: Reconfigurable, metrics: EngineMetrics
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context running the watcher for the app's lifetime."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch(path, load, runner, metrics))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
