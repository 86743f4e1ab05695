"""HTTP surface of the coordinator sidecar (aiohttp, on the hot path)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.dataplane.httpserver import api_error_response, error_middleware, json_response
from modelfleet.dataplane.protocol import ApiError
from modelfleet.dataplane.sidecar.service import Coordinator
from modelfleet.dataplane.sidecar.tiers import LOCAL_TIER, TIER_HEADER
from modelfleet.dataplane.upstream import new_session, relay, request_headers, response_headers

COORDINATOR = web.AppKey("coordinator", Coordinator)


async def proxy(request: web.Request) -> web.StreamResponse:
    coord = request.app[COORDINATOR]
    body = await request.read()
    attempt = await coord.forward(request.path, body, request_headers(request.headers))
    upstream = attempt.response
    try:
        tier = coord.tier_of(attempt.url)
        headers = response_headers(upstream) | {TIER_HEADER: tier}
        if tier == LOCAL_TIER:
            headers["x-modelfleet-replica"] = str(coord.replica_index(attempt.url))
        streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
        if not streaming:
            try:
                data = b"".join([chunk async for chunk in relay(upstream, streaming=False)])
            except ApiError as exc:
                return api_error_response(exc)
            return web.Response(body=data, status=upstream.status, headers=headers)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        async for chunk in relay(upstream, streaming=True):
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        coord.end(attempt.url)


async def models(request: web.Request) -> web.Response:
    coord = request.app[COORDINATOR]
    assert coord.session is not None
    for peer in coord.peers:
        if peer.healthy:
            try:
                async with coord.session.get(peer.url + "/v1/models") as resp:
                    return json_response(await resp.json(), status=resp.status)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue  # died since its last health check: ask the next one
    return json_response({"object": "list", "data": []})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    coord = request.app[COORDINATOR]
    view = [{"url": p.url, "healthy": p.healthy, "outstanding": p.outstanding} for p in coord.peers]
    ready = coord.ready()
    return json_response(
        {"status": "ready" if ready else "no_ready_replica", "replicas": view}, status=200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[COORDINATOR].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(coord: Coordinator) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=32 * 1024 * 1024)
    app[COORDINATOR] = coord
    app.router.add_post("/v1/chat/completions", proxy)
    app.router.add_post("/v1/completions", proxy)
    app.router.add_post("/v1/embeddings", proxy)
    app.router.add_post("/v1/rerank", proxy)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        coord.session = new_session()
        task = asyncio.create_task(coord.health_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await coord.session.close()

    app.cleanup_ctx.append(lifecycle)
    return app
