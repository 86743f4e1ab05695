"""Process entry point of the gateway (aiohttp, served like the sidecar)."""

from __future__ import annotations

import asyncio
import logging

from modelfleet.dataplane.gateway.api import create_app
from modelfleet.dataplane.gateway.auth import AuthConfig
from modelfleet.dataplane.gateway.cors import CorsPolicy
from modelfleet.dataplane.gateway.discovery import refresh_forever
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.gateway.service import GatewayService
from modelfleet.dataplane.httpserver import serve
from modelfleet.dataplane.settings import GatewaySettings

log = logging.getLogger(__name__)


def run(settings: GatewaySettings) -> None:
    auth = None
    if settings.api_keys is not None or settings.admin_token is not None:
        auth = AuthConfig(settings.api_keys, settings.admin_token, settings.auth_reload_interval_s)
    if settings.api_keys is None:
        log.warning("no API keys configured: the gateway is OPEN, any client may call it (--api-keys FILE)")
    cors = (
        CorsPolicy.of(settings.cors_allowed_origins, settings.cors_allow_credentials)
        if settings.cors_allowed_origins
        else None
    )
    if settings.routes is not None:
        app = create_app(RoutingTable.from_file(settings.routes), auth_config=auth, cors=cors)
    else:

        async def refresher(service: GatewayService) -> None:
            def install(table: RoutingTable) -> None:
                service.table = table

            await refresh_forever(install, settings.refresh_interval_s)

        app = create_app(RoutingTable([]), refresher, auth_config=auth, cors=cors)
    asyncio.run(serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s))
