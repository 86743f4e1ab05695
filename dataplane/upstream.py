"""Forwarding a request to one of several upstreams: shared by gateway and sidecar.

A request is retried on another upstream only while nothing has been sent to
the client: on a refused connection, or a 503 (not ready, draining) or 429
(queue full) answer. Once the upstream's status line is accepted, its bytes
are relayed as they come; a failure mid-stream becomes an explicit SSE error
event, never a silent truncation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from modelfleet.dataplane import tracing
from modelfleet.dataplane.protocol import ApiError, error_body, unavailable

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 503})
MAX_HELD_EVENT_BYTES = 1 << 20  # a partial SSE event longer than this is passed on as is
# Headers passed between hops. Everything else (hop-by-hop, auth) stays behind.
FORWARDED_REQUEST_HEADERS = ("content-type", "x-request-id", "x-session-id", "x-modelfleet-priority")
FORWARDED_RESPONSE_HEADERS = (
    "content-type",
    "retry-after",
    "x-request-id",
    "x-modelfleet-replica",
    "x-modelfleet-tier",
    "x-modelfleet-queue-depth",
    "x-modelfleet-kv-usage",
)


def new_session(limit: int = 1024) -> aiohttp.ClientSession:
    """One pooled client per process. asyncio sets TCP_NODELAY on every TCP socket."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=None)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


@dataclass
class Attempt:
    url: str
    response: aiohttp.ClientResponse


PickFn = Callable[[set[str]], str | None]
FailFn = Callable[[str, str], None]


async def open_upstream(
    session: aiohttp.ClientSession,
    pick: PickFn,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    retry_budget: int,
    on_retry: FailFn,
    what: str,
) -> Attempt:
    """POST to the first upstream that accepts; retries unstarted requests elsewhere."""
    tried: set[str] = set()
    last_error: ApiError | None = None
    for _ in range(retry_budget + 1):
        url = pick(tried)
        if url is None:
            break
        tried.add(url)
        try:
            tracing.inject(headers)  # the next hop's span joins this request's trace (off: a no-op)
            resp = await session.post(url + path, data=body, headers=headers)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            on_retry(url, "connect")
            log.warning("%s: upstream %s unreachable: %s", what, url, type(exc).__name__)
            last_error = unavailable(1, f"No replica of {what} could be reached.")
            continue
        if resp.status in RETRYABLE_STATUS:
            raw = await resp.read()
            retry_after = resp.headers.get("Retry-After", "1")
            resp.release()
            on_retry(url, str(resp.status))
            last_error = _passthrough_error(resp.status, raw, retry_after)
            continue
        return Attempt(url, resp)
    raise last_error or unavailable(5, f"{what} has no ready replica.")


def _passthrough_error(status: int, raw: bytes, retry_after: str) -> ApiError:
    try:
        err = json.loads(raw)["error"]
        return ApiError(
            status,
            err["message"],
            type=err.get("type") or "server_error",
            param=err.get("param"),
            code=err.get("code"),
            headers={"Retry-After": retry_after},
        )
    except (ValueError, KeyError, TypeError):
        return ApiError(
            status, "Upstream unavailable.", type="service_unavailable", headers={"Retry-After": retry_after}
        )


def response_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k in FORWARDED_RESPONSE_HEADERS if (v := resp.headers.get(k)) is not None}


def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):  # aiohttp's: already case-insensitive
        return {k: v for k in FORWARDED_REQUEST_HEADERS if (v := headers.get(k)) is not None}
    source = {k.lower(): v for k, v in headers.items()}
    return {k: source[k] for k in FORWARDED_REQUEST_HEADERS if k in source}


def sse_error_event(message: str, code: str = "upstream_failed") -> bytes:
    body = error_body(message, type="server_error", code=code)
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


def _event_end(data: bytes) -> int:
    """Where the last complete SSE event in ``data`` ends (0: none is complete)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


async def relay(resp: aiohttp.ClientResponse, *, streaming: bool) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; a broken stream ends with an error event.

    A stream is passed on in whole events: a partial one waits for its end, so
    when the upstream breaks mid-event the client gets the error event alone,
    not glued to half an event it cannot parse.
    """
    finished = False
    held = b""
    try:
        async for data in resp.content.iter_any():
            if streaming:
                data = held + data
                end = _event_end(data) if len(data) < MAX_HELD_EVENT_BYTES else len(data)
                data, held = data[:end], data[end:]
                if not data:
                    continue
            yield data
        if held:
            yield held
        finished = True
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        log.warning("upstream stream broke: %s", type(exc).__name__)
        if streaming:
            yield sse_error_event("The replica failed while streaming; the response is incomplete.")
        else:
            raise ApiError(
                502, "The replica failed before completing the response.", type="server_error", code="upstream_failed"
            ) from None
    finally:
        if finished:
            resp.release()
        else:
            resp.close()  # the client left or the stream broke: drop the connection so upstream cancels
