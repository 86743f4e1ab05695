"""Process entry point of a coordinator sidecar."""

from __future__ import annotations

import asyncio

from modelfleet.dataplane.httpserver import serve
from modelfleet.dataplane.settings import SidecarSettings
from modelfleet.dataplane.sidecar.api import build_app
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.routing import make_policy
from modelfleet.dataplane.sidecar.service import Coordinator


def run(settings: SidecarSettings) -> None:
    coord = Coordinator(
        settings.deployment,
        settings.peers,
        make_policy(settings.policy),
        SidecarMetrics(),
        retry_budget=settings.retry_budget,
    )
    asyncio.run(serve(build_app(coord), settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))
