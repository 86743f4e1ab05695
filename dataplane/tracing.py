"""Optional OpenTelemetry tracing: one server span per request in every role, joined across hops.

Off unless ``MODELFLEET_OTEL_ENDPOINT`` names an OTLP/HTTP collector (for
example ``http://otel-collector:4318``); then each role (gateway, sidecar,
engine) exports its spans as service ``modelfleet-<role>``, and the W3C
``traceparent`` of the span handling a request is sent with the request to the
next hop (dataplane/upstream.py), so a trace shows gateway -> sidecar ->
engine, with retries as separate child spans' parents. Spans carry the method,
path, status and the request id; never a prompt or a key.

When off, nothing of OpenTelemetry is imported and the hot path pays one
boolean test per hop. The ``otel`` extra installs the SDK and the exporter.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

ENDPOINT_ENV = "MODELFLEET_OTEL_ENDPOINT"

_state: dict[str, Any] = {"enabled": False, "role": "modelfleet"}


def enabled() -> bool:
    return bool(_state["enabled"])


def setup(role: str, endpoint: str | None = None) -> bool:
    """Exports spans to ``endpoint`` (default: $MODELFLEET_OTEL_ENDPOINT); returns whether tracing is on."""
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"{ENDPOINT_ENV} is set but OpenTelemetry is not installed: pip install 'modelfleet[otel]' ({exc.name})"
        ) from None
    provider = _provider(role)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    return use(provider, role)


def _provider(role: str) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider(resource=Resource.create({"service.name": f"modelfleet-{role}"}))


def use(provider: Any, role: str) -> bool:
    """Installs a tracer provider (tests pass one with an in-memory exporter)."""
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    _state.update(enabled=True, role=role, provider=provider)
    return True


def inject(headers: MutableMapping[str, str]) -> None:
    """Adds the current span's ``traceparent`` (and ``tracestate``) to a request going to the next hop."""
    if _state["enabled"]:
        from opentelemetry import propagate

        propagate.inject(headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(role: str | None = None) -> Middleware:
    """A server span per request, continuing the caller's trace (inner to the error middleware)."""
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    name = role or str(_state["role"])
    tracer = trace.get_tracer("modelfleet", tracer_provider=_state.get("provider"))

    @web.middleware
    async def tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
        context = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span(
            f"{name} {request.method} {request.path}", context=context, kind=SpanKind.SERVER
        ) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.path)
            rid = request.headers.get("x-request-id")
            if rid:
                span.set_attribute("modelfleet.request_id", rid[:128])
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            except Exception as exc:  # an ApiError becomes its status in the error middleware outside
                status = getattr(exc, "status", 500)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return tracing


def instrument(app: web.Application, role: str | None = None) -> None:
    """Adds the span middleware to an app not yet started, when tracing is on."""
    if _state["enabled"]:
        app.middlewares.append(middleware(role))
