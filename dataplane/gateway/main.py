"""Process entry point of the gateway (uvicorn)."""

from __future__ import annotations

import uvicorn

from modelfleet.dataplane.gateway.api import create_app
from modelfleet.dataplane.gateway.discovery import refresh_forever
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.gateway.service import GatewayService
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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        lifespan="on",
    )
    uvicorn.Server(config).run()
