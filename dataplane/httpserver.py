"""aiohttp plumbing shared by the engine and the sidecar (the lean hot path).

Errors leave in the OpenAI shape; a client that disconnects cancels its
handler (``handler_cancellation``), which cancels the work behind it.

Graceful drain (docs/reliability.md), the same in every role: on SIGTERM or
SIGINT ``serve()`` turns the process not ready at once (``/readyz`` answers
503 ``draining``), refuses new work (every POST) with a retriable 503 and
``Retry-After`` in the OpenAI error shape, so the layer above retries
elsewhere, and lets requests in flight, SSE streams included, finish within
``shutdown_timeout`` seconds. A stream still running at that deadline ends
with an SSE error event and ``[DONE]``, never a silent cut; then the process
stops its cleanup contexts and exits 0. A second signal ends the grace period
at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelfleet.dataplane import tracing
from modelfleet.dataplane.logs import REQUEST_ID, bounded_request_id
from modelfleet.dataplane.protocol import ApiError, error_body, internal_error
from modelfleet.dataplane.upstream import sse_error_event

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


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # probes, metrics, listings: answered while draining
DRAIN_RETRY_AFTER_S = 1
_STREAM = web.RequestKey("modelfleet_sse_response", web.StreamResponse)  # the SSE response a request prepared


def draining_error() -> ApiError:
    """The answer to new work while draining: retriable, so a sidecar or the gateway retries elsewhere."""
    return ApiError(
        503,
        "This server is shutting down; retry the request.",
        type="service_unavailable",
        code="draining",
        headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
    )


class Drain:
    """The drain state of one serving process: whether it drains, and the requests it still owes."""

    def __init__(self, on_drain: Callable[[], None] | None = None) -> None:
        self.draining = False
        self.expired = False  # the grace period is over: what is still running is cancelled
        self.in_flight: set[asyncio.Task[Any]] = set()
        self._on_drain = on_drain

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            if self._on_drain is not None:
                self._on_drain()

    async def wait_idle(self) -> None:
        """Until every request in flight has finished (the caller bounds the wait)."""
        while self.in_flight:
            await asyncio.wait(set(self.in_flight))

    async def expire(self) -> None:
        """Cancel what is still running; its streams end with an error event (``middleware``)."""
        self.expired = True
        tasks = set(self.in_flight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def middleware(self) -> Middleware:
        @web.middleware
        async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            work = request.method not in SAFE_METHODS
            if self.draining:
                if request.path == "/readyz":
                    body = {"status": "draining", "in_flight": len(self.in_flight)}
                    return json_response(body, status=503)
                if work:
                    raise draining_error()
            task = asyncio.current_task()
            if not work or task is None:
                return await handler(request)
            self.in_flight.add(task)
            try:
                return await handler(request)
            except asyncio.CancelledError:
                resp: web.StreamResponse | None = request.get(_STREAM)
                if not self.expired or resp is None or resp._eof_sent:
                    raise
                task.uncancel()  # this process cancelled it at the deadline: end the stream in words
                log.warning("grace period over: ending a stream on %s with an error event", request.path)
                try:
                    await resp.write(
                        sse_error_event("The server shut down before the response completed.", code="shutdown")
                    )
                    await resp.write_eof()
                except (ConnectionResetError, RuntimeError):
                    pass  # the client is gone too
                return resp
            finally:
                self.in_flight.discard(task)

        return drain_middleware


async def _note_stream(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: remember an SSE response, so a stream cut at the deadline can be ended in words."""
    if response.content_type == "text/event-stream":
        request[_STREAM] = response


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 30.0,
    on_started: Callable[[], None] | None = None,
    on_drain: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain (see the module's docstring) and stop.

    ``on_drain``: the role's hook, called once when draining starts (the engine marks itself draining).
    """
    drain = Drain(on_drain)
    app.middlewares.append(drain.middleware())  # inside error_middleware: its refusals leave in the OpenAI shape
    app.on_response_prepare.append(_note_stream)
    # the drain below does the waiting; aiohttp's own shutdown only closes idle connections
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    tracing.instrument(app)  # a span per request when MODELFLEET_OTEL_ENDPOINT is set (dataplane/tracing.py)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    if on_started is not None:
        on_started()
    stop = asyncio.Event()
    hurry = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await stop.wait()
        drain.begin()
        log.info(
            "draining %s:%d: %d request(s) in flight, %.0f s grace", host, port, len(drain.in_flight), shutdown_timeout
        )
        idle = asyncio.create_task(drain.wait_idle())
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait({idle, hurried}, timeout=shutdown_timeout, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not idle.done():
            idle.cancel()
            log.warning("grace period over with %d request(s) in flight: ending them", len(drain.in_flight))
            await drain.expire()
    finally:
        log.info("shutting down %s:%d", host, port)
        await runner.cleanup()
