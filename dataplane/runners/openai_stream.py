"""Relaying an OpenAI-compatible backend's answer: its body's bytes, whether a stream was cut, its errors.

Shared by the passthrough runners (remote providers; vLLM and SGLang
servers). Nothing here parses the answer's content: the bytes go to the client
as they arrive (``body_chunks``), and the engine reads only the usage
(engine/passthrough.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from modelfleet.dataplane.protocol import error_body
from modelfleet.dataplane.runners.base import RunnerError

DONE = b"data: [DONE]"
TAIL = 64  # bytes of the body kept to see how a stream ended


class StreamBrokenError(RunnerError):
    """The backend's body broke off: the connection failed, or a stream ended before ``data: [DONE]``."""


def estimate_tokens(text: str) -> int:
    """A provider-agnostic token estimate: about four characters per token for English text and code."""
    return max(1, (len(text) + 3) // 4)


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


async def body_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body as it arrives. A server-sent-event stream must end with ``data: [DONE]``:
    one that ends without it was cut off (a backend that died, a dropped connection), never a whole answer."""
    sse = is_event_stream(resp)
    tail = b""
    try:
        async for data in resp.content.iter_any():
            if sse:
                tail = (tail + data)[-TAIL:]
            yield data
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise StreamBrokenError(f"the body broke off ({type(exc).__name__})") from None
    if sse and not tail.rstrip().endswith(DONE):
        raise StreamBrokenError("the stream ended without data: [DONE] (cut off)")


def error_answer(status: int, raw: bytes) -> bytes:
    """A backend's error body as the client gets it: as sent when it is OpenAI-shaped, else wrapped in one."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "message" in doc["error"]:
        return raw
    kind = "server_error" if status >= 500 else "invalid_request_error"
    message = f"The backend answered HTTP {status}."
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):  # vLLM's older flat error shape
        message = doc["message"]
    return json.dumps(error_body(message, type=kind, code=f"upstream_{status}")).encode()
