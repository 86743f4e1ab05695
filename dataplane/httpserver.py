"""aiohttp plumbing shared by the engine and the sidecar (the lean hot path).

Errors leave in the OpenAI shape; a client that disconnects cancels its
handler (``handler_cancellation``), which cancels the work behind it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from modelfleet.dataplane.logs import REQUEST_ID, bounded_request_id
from modelfleet.dataplane.protocol import ApiError, error_body, internal_error

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def api_error_response(exc: ApiError) -> web.Response:
    return json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # the outermost middleware of every role: log lines of this request carry its id (dataplane/logs.py)
    token = REQUEST_ID.set(bounded_request_id(request.headers.get("x-request-id")))
    try:
        return await handler(request)
    except ApiError as exc:
        return api_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return json_response(error_body(exc.reason, type=kind, code=str(exc.status)), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return api_error_response(internal_error())
    finally:
        REQUEST_ID.reset(token)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 30.0,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and stop."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    if on_started is not None:
        on_started()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down %s:%d", host, port)
        await runner.cleanup()
