"""HTTP surface of the coordinator sidecar (aiohttp, on the hot path)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.dataplane.httpserver import api_error_response, error_middleware, json_response
from modelfleet.dataplane.protocol import ApiError
from modelfleet.dataplane.sidecar.rollout import (
    BASELINE,
    CANDIDATE,
    Capture,
    RolloutTraffic,
    Route,
    comparable,
    request_id,
)
from modelfleet.dataplane.sidecar.service import Coordinator
from modelfleet.dataplane.sidecar.tiers import LOCAL_TIER, TIER_HEADER
from modelfleet.dataplane.upstream import Attempt, new_session, relay, request_headers, response_headers

COORDINATOR = web.AppKey("coordinator", Coordinator)
ROLLOUT = web.AppKey("rollout", RolloutTraffic)


async def proxy(request: web.Request) -> web.StreamResponse:
    coord = request.app[COORDINATOR]
    body = await request.read()
    headers = request_headers(request.headers)
    traffic = request.app.get(ROLLOUT)
    route = traffic.route() if traffic is not None else None
    if traffic is None or route is None:
        return await _respond(request, coord, await coord.forward(request.path, body, headers))
    return await _rollout_proxy(request, coord, traffic, route, body, headers)


async def _respond(
    request: web.Request,
    coord: Coordinator,
    attempt: Attempt,
    tracked: Capture | None = None,
    on_done: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Relay one upstream answer to the client; ``tracked`` reads what it said (rollout observations) and
    ``on_done`` runs once the answer is over, however it ended."""
    upstream = attempt.response
    if tracked is not None:
        tracked.status = upstream.status
        tracked.read_headers(upstream.headers)
    try:
        tier = coord.tier_of(attempt.url)
        headers = response_headers(upstream) | {TIER_HEADER: tier}
        if tier == LOCAL_TIER and attempt.url in coord.peer_urls():
            headers["x-modelfleet-replica"] = str(coord.replica_index(attempt.url))
        streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
        if tracked is not None:
            tracked.streaming = streaming
        if not streaming:
            try:
                data = b"".join([chunk async for chunk in relay(upstream, streaming=False)])
            except ApiError as exc:
                if tracked is not None:
                    tracked.status = exc.status
                return api_error_response(exc)
            if tracked is not None:
                tracked.feed(data)
            return web.Response(body=data, status=upstream.status, headers=headers)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        async for chunk in relay(upstream, streaming=True):
            if tracked is not None:
                tracked.feed(chunk)
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        coord.end(attempt.url)
        if on_done is not None:
            on_done()


async def _rollout_proxy(
    request: web.Request,
    coord: Coordinator,
    traffic: RolloutTraffic,
    route: Route,
    body: bytes,
    headers: dict[str, str],
) -> web.StreamResponse:
    """One request under a rollout plan: served by one side, perhaps mirrored to the other, observed on both."""
    plan = traffic.plan
    assert plan is not None
    rid = request_id(headers)
    headers = {**headers, "x-request-id": rid}
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    compare = isinstance(parsed, dict) and comparable(parsed)
    coord.metrics.rollout_requests.labels(side=route.serve, role="served").inc()
    served = Capture(rid, compare)

    def record(url: str | None) -> None:
        obs = served.observation(traffic.side(route.serve), url, plan.strategy.value.lower())
        traffic.record(route.serve, plan.id, obs)

    try:
        if route.serve == CANDIDATE:
            try:
                attempt = await coord.forward_to(traffic.candidate_url(), request.path, body, headers, "candidate")
            except ApiError as exc:
                # the candidate failed before a byte: its error is evidence, but the client is served by
                # the baseline (a rolled-back candidate may stop while this sidecar still holds the plan)
                served.status = exc.status
                record(None)
                return await _respond(request, coord, await coord.forward(request.path, body, headers))
        else:
            attempt = await coord.forward(request.path, body, headers)
    except ApiError as exc:
        served.status = exc.status
        record(None)
        raise
    if route.mirror is not None and isinstance(parsed, dict):
        _start_mirror(coord, traffic, route.mirror, plan.id, request.path, parsed, headers, compare)
    return await _respond(request, coord, attempt, served, lambda: record(attempt.url))


def _start_mirror(
    coord: Coordinator,
    traffic: RolloutTraffic,
    side: str,
    plan_id: str,
    path: str,
    body: dict[str, object],
    headers: dict[str, str],
    compare: bool,
) -> None:
    if traffic.mirrors.locked():
        coord.metrics.rollout_mirror_dropped.inc()
        return
    if "input" not in body:  # generation: stream, so the mirror's time to first token is measured too
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    task = asyncio.create_task(
        _mirror(coord, traffic, side, plan_id, path, json.dumps(body).encode(), headers, compare)
    )
    traffic.tasks.add(task)
    task.add_done_callback(traffic.tasks.discard)


async def _mirror(
    coord: Coordinator,
    traffic: RolloutTraffic,
    side: str,
    plan_id: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    compare: bool,
) -> None:
    """Send a copy to the other side and record its observation; its answer goes nowhere else."""
    async with traffic.mirrors:
        coord.metrics.rollout_requests.labels(side=side, role="mirror").inc()
        capture = Capture(headers["x-request-id"], compare)
        url: str | None = None
        try:
            if side == CANDIDATE:
                attempt = await coord.forward_to(traffic.candidate_url(), path, body, headers, "candidate")
            else:
                attempt = await coord.forward(path, body, headers)
            url = attempt.url
            capture.status = attempt.response.status
            capture.read_headers(attempt.response.headers)
            capture.streaming = attempt.response.headers.get("content-type", "").startswith("text/event-stream")
            try:
                async for chunk in relay(attempt.response, streaming=capture.streaming):
                    capture.feed(chunk)
            finally:
                coord.end(attempt.url)
        except ApiError as exc:
            capture.status = exc.status
        except (aiohttp.ClientError, TimeoutError):
            capture.status = 502
        traffic.record(side, plan_id, capture.observation(traffic.side(side), url, "mirror"))


async def rollout_observations(request: web.Request) -> web.Response:
    traffic = request.app.get(ROLLOUT)
    if traffic is None:
        return json_response({"id": None, BASELINE: [], CANDIDATE: []})
    return json_response(traffic.snapshot(request.query.get("id")))


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


def build_app(coord: Coordinator, rollout: RolloutTraffic | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=32 * 1024 * 1024)
    app[COORDINATOR] = coord
    if rollout is not None:
        app[ROLLOUT] = rollout
    app.router.add_get("/rollout/observations", rollout_observations)
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
        if rollout is not None:  # mirrors in flight: their answers go nowhere anyway
            for mirror in list(rollout.tasks):
                mirror.cancel()
            await asyncio.gather(*rollout.tasks, return_exceptions=True)
        await coord.session.close()

    app.cleanup_ctx.append(lifecycle)
    return app
