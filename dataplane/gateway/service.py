"""Gateway logic: route a validated request to its deployment and relay the answer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from modelfleet.dataplane.gateway.metrics import GatewayMetrics
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable
from modelfleet.dataplane.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ForwardedGeneration,
    ForwardedRequest,
    RerankRequest,
    SamplingFields,
)
from modelfleet.dataplane.upstream import open_upstream, relay, request_headers, response_headers

log = logging.getLogger(__name__)

USAGE_KEY = b'"usage"'


@dataclass
class Relayed:
    """An upstream answer ready to hand to the client."""

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None


class GatewayService:
    def __init__(self, table: RoutingTable, metrics: GatewayMetrics) -> None:
        self.table = table
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None

    def models(self) -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": route.created, "owned_by": "modelfleet"}
                for model, route in self.table.model_ids()
            ],
        }

    async def forward(
        self,
        endpoint: str,
        req: ChatCompletionRequest | CompletionRequest | EmbeddingRequest | RerankRequest | ForwardedRequest,
        request_id: str,
        client_headers: Mapping[str, str] | None = None,
        *,
        raw: bytes | None = None,
        on_usage: Callable[[int, int], None] | None = None,
    ) -> Relayed:
        """``raw``: the body to send as is (the HTTP layer's patched client bytes); else ``req`` re-encoded.

        ``on_usage(prompt_tokens, completion_tokens)``: called with the answer's usage (the API key's tally).
        A refusal (ApiError) is counted here, under the deployment the model resolved to, or ``none``.
        """
        try:
            route = self.table.lookup(req.model)
        except ApiError as exc:
            self.count_error(endpoint, exc, None)
            raise
        if raw is not None:
            body = raw
        else:
            payload = req.model_dump(exclude_unset=True, mode="json")
            if isinstance(req, SamplingFields | ForwardedGeneration) and req.streams:
                # Always ask for usage so token metrics are complete; the usage
                # event is dropped again unless the client asked for it.
                payload["stream_options"] = {"include_usage": True}
            body = json.dumps(payload, separators=(",", ":")).encode()
        endpoints = self.table.endpoints_in_turn(route)
        order = iter(endpoints)

        def pick(exclude: set[str]) -> str | None:
            return next((u for u in order if u not in exclude), None)

        assert self.session is not None
        started = time.perf_counter()
        try:
            attempt = await open_upstream(
                self.session,
                pick,
                endpoint,
                body,
                request_headers(client_headers or {})
                | {"content-type": "application/json", "x-request-id": request_id},
                retry_budget=len(endpoints) - 1,
                on_retry=lambda url, reason: log.warning("sidecar %s answered %s; trying another", url, reason),
                what=f"deployment {route.name!r}",
            )
        except ApiError as exc:
            self.count_error(endpoint, exc, route.name)
            raise
        upstream = attempt.response
        headers = response_headers(upstream)
        if not headers.get("content-type", "").startswith("text/event-stream"):
            data = b"".join([c async for c in relay(upstream, streaming=False)])
            self._count_usage_json(route, data, on_usage)
            self._observe(route, endpoint, upstream.status, started)
            return Relayed(upstream.status, headers, body=data)
        return Relayed(
            upstream.status,
            headers,
            stream=self._events(
                route,
                endpoint,
                upstream,
                started,
                isinstance(req, SamplingFields | ForwardedGeneration) and req.wants_usage_in_stream(),
                on_usage,
            ),
        )

    async def _events(
        self,
        route: DeploymentRoute,
        endpoint: str,
        upstream: aiohttp.ClientResponse,
        started: float,
        keep_usage: bool,
        on_usage: Callable[[int, int], None] | None = None,
    ) -> AsyncIterator[bytes]:
        buffer = b""
        first = True
        try:
            async for data in relay(upstream, streaming=True):
                if first:
                    self.metrics.ttft.labels(route.name).observe(time.perf_counter() - started)
                    first = False
                if not buffer and data.endswith(b"\n\n") and USAGE_KEY not in data:
                    yield data  # whole events, none of them usage: as they came
                    continue
                buffer += data
                out = []
                while (end := buffer.find(b"\n\n")) >= 0:
                    event, buffer = buffer[: end + 2], buffer[end + 2 :]
                    if USAGE_KEY in event and self._usage_event(route, event, on_usage) and not keep_usage:
                        continue
                    out.append(event)
                if out:
                    yield b"".join(out)
            if buffer:
                yield buffer
        finally:
            self._observe(route, endpoint, upstream.status, started)

    def _usage_event(self, route: DeploymentRoute, event: bytes, on_usage: Callable[[int, int], None] | None) -> bool:
        """Whether the event is a stream's usage event (no choices, a usage object); its usage is counted.

        Parsed only when it contains ``"usage"``; spacing is the backend's own (a passthrough backend's
        bytes reach the gateway as it wrote them)."""
        data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(doc, dict) or doc.get("choices") != [] or not isinstance(doc.get("usage"), dict):
            return False
        self._count_usage(route, doc["usage"], on_usage)
        return True

    def _count_usage_json(
        self, route: DeploymentRoute, data: bytes, on_usage: Callable[[int, int], None] | None = None
    ) -> None:
        try:
            usage = json.loads(data).get("usage") or {}
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self._count_usage(route, usage, on_usage)

    def _count_usage(
        self, route: DeploymentRoute, usage: dict[str, Any], on_usage: Callable[[int, int], None] | None
    ) -> None:
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.metrics.prompt_tokens.labels(route.name).inc(prompt)
        self.metrics.completion_tokens.labels(route.name).inc(completion)
        if on_usage is not None and usage:
            on_usage(prompt, completion)

    def _observe(self, route: DeploymentRoute, endpoint: str, status: int, started: float) -> None:
        self.metrics.requests.labels(route.name, endpoint, str(status)).inc()
        self.metrics.latency.labels(route.name, endpoint).observe(time.perf_counter() - started)

    def count_error(self, endpoint: str, exc: ApiError, deployment: str | None) -> None:
        """A refusal by the gateway itself; ``deployment`` None: the request named no deployment (unknown model)."""
        self.metrics.requests.labels(deployment or "none", endpoint, str(exc.status)).inc()
