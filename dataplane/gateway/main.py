"""Process entry point of the gateway (aiohttp, served like the sidecar)."""

from __future__ import annotations

import asyncio

from modelfleet.dataplane.gateway.api import create_app
from modelfleet.dataplane.gateway.discovery import refresh_forever
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.gateway.service import GatewayService
from modelfleet.dataplane.httpserver import serve
from modelfleet.dataplane.settings import GatewaySettings


def run(settings: GatewaySettings) -> None:
    if settings.routes is not None:
        app = create_app(RoutingTable.from_file(settings.routes))
    else:

        async def refresher(service: GatewayService) -> None:
            def install(table: RoutingTable) -> None:
                service.table = table

            await refresh_forever(install, settings.refresh_interval_s)

        app = create_app(RoutingTable([]), refresher)
    asyncio.run(serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))
