"""OpenTelemetry tracing across hops: a real sidecar app and a stand-in engine on loopback, spans kept in the
SDK's in-memory exporter (no collector runs here). The engine stands in so the hop can be observed; it
serves through the same span middleware as every role."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelfleet.dataplane import tracing
from modelfleet.dataplane.httpserver import error_middleware
from modelfleet.dataplane.sidecar.api import build_app
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.routing import make_policy
from modelfleet.dataplane.sidecar.service import Coordinator

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider, "sidecar")
    yield exporter
    tracing._state.update(enabled=False)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    tracing.instrument(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.mark.asyncio
async def test_a_request_is_one_trace_from_the_caller_through_the_sidecar_to_the_engine(
    spans: InMemorySpanExporter,
) -> None:
    seen: dict[str, str] = {}

    async def chat(request: web.Request) -> web.Response:
        seen.update(request.headers)
        return web.json_response({"choices": []})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    engine_app = web.Application(middlewares=[error_middleware])
    engine_app.router.add_post("/v1/chat/completions", chat)
    engine_app.router.add_get("/readyz", readyz)
    engine, engine_url = await serve(engine_app)
    coord = Coordinator("t", [engine_url], make_policy("RoundRobin"), SidecarMetrics(), health_interval_s=0.05)
    sidecar, sidecar_url = await serve(build_app(coord))
    try:
        for _ in range(500):
            if coord.ready():
                break
            await asyncio.sleep(0.02)
        spans.clear()
        headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "x-request-id": "req-7"}
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": [{"role": "user", "content": "secret prompt"}]}
            async with session.post(sidecar_url + "/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.status == 200
    finally:
        await sidecar.cleanup()
        await engine.cleanup()
    finished = [s for s in spans.get_finished_spans() if "POST /v1/chat/completions" in s.name]
    assert len(finished) == 2
    sent_parent = int(seen["traceparent"].split("-")[2], 16)  # what the sidecar sent the engine: its own span
    sidecar_span = next(s for s in finished if s.context.span_id == sent_parent)
    engine_span = next(s for s in finished if s is not sidecar_span)
    assert {s.context.trace_id for s in finished} == {int(TRACE_ID, 16)}  # the caller's trace, continued
    assert sidecar_span.parent is not None and sidecar_span.parent.span_id == int(CALLER_SPAN, 16)
    assert engine_span.parent is not None and engine_span.parent.span_id == sidecar_span.context.span_id
    attrs = dict(sidecar_span.attributes or {})
    assert attrs["http.response.status_code"] == 200 and attrs["modelfleet.request_id"] == "req-7"
    assert all("secret prompt" not in str(s.attributes) for s in finished)


def test_off_by_default_adds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    assert tracing.setup("gateway") is False
    state = dict(tracing._state)
    tracing._state.update(enabled=False)
    try:
        headers: dict[str, str] = {}
        tracing.inject(headers)
        assert headers == {}
        app = web.Application()
        tracing.instrument(app)
        assert list(app.middlewares) == []
    finally:
        tracing._state.update(state)
