"""A purpose-built OpenAI-compatible "hosted provider" for the remote-runner tests.

Hosted providers cannot be reached from these machines, so this small real
HTTP server on loopback plays one (streamed answers as server-sent events
when the request says ``stream: true``, else one JSON body, as providers do),
with the failures a provider shows: a
rejected key (401), 429 with Retry-After, 500, a slow first byte, a stream
cut mid-way, and a stream that stalls mid-way until the caller goes away. It
checks ``Authorization: Bearer <key>`` against the keys it accepts, records
every request it gets (headers, body and arrival time ``at`` on
``time.monotonic()``), and streams a fixed answer with usage in its last
event. Failures are scripted per request:
``provider.script(["429", "500", "ok"])`` makes the next three requests
answer that way; unscripted requests are "ok".

It runs in a thread with its own event loop, so synchronous tests (which drive
``modelfleet up`` subprocesses) can start it as a fixture.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from typing import Any

from aiohttp import web

ANSWER = ["Hello", " from", " the", " provider", "."]


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FakeProvider:
    """The server and what it saw. ``url`` ends in /v1, like a provider's base URL."""

    def __init__(self, keys: set[str] | None = None, slow_s: float = 3.0) -> None:
        self.keys = set(keys or {"sk-test-1"})
        self.slow_s = slow_s
        self.requests: list[dict[str, Any]] = []
        self._script: deque[str] = deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, outcomes: list[str]) -> None:
        with self._lock:
            self._script.extend(outcomes)

    def accept_only(self, *keys: str) -> None:
        with self._lock:
            self.keys = set(keys)

    def _next(self) -> str:
        with self._lock:
            return self._script.popleft() if self._script else "ok"

    # ---- the server -------------------------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        with self._lock:
            self.requests.append(
                {"path": request.path, "headers": dict(request.headers), "body": body, "at": time.monotonic()}
            )
            keys = set(self.keys)
        if auth.removeprefix("Bearer ") not in keys:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        outcome = self._next()
        if outcome == "429":
            return _error(
                429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded", {"Retry-After": "1"}
            )
        if outcome == "500":
            return _error(500, "The server had an error.", "server_error", None)
        if outcome == "400":
            return _error(
                400,
                "This model's maximum context length is 8 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
            )
        if outcome == "slow":
            await asyncio.sleep(self.slow_s)
        chat = request.path.endswith("/chat/completions")
        if body.get("stream") is not True:
            return await self._whole(request, body, chat, outcome)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "prov-1", "created": int(time.time()), "model": body.get("model")}
        words = ANSWER[:2] if outcome in ("cut", "stall") else ANSWER
        for word in words:
            choice: dict[str, Any] = {"index": 0, "finish_reason": None}
            choice.update({"delta": {"content": word}} if chat else {"text": word})
            await resp.write(_event({**base, "object": "chat.completion.chunk", "choices": [choice]}))
        if outcome == "stall":  # the words are out; the rest never comes while the caller stays connected
            for _ in range(1200):  # at most a minute
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.05)
            return resp
        if outcome == "cut":
            assert request.transport is not None
            # let the words reach the client first: a close in the same read would make aiohttp raise before
            # handing out the buffered events, and the cut would land before the first byte, not mid-stream
            await asyncio.sleep(1.0)
            request.transport.close()  # the connection drops mid-stream
            return resp
        end: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        end.update({"delta": {}} if chat else {"text": ""})
        await resp.write(_event({**base, "choices": [end]}))
        usage = {"prompt_tokens": 11, "completion_tokens": len(ANSWER), "total_tokens": 11 + len(ANSWER)}
        await resp.write(_event({**base, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _whole(self, request: web.Request, body: dict[str, Any], chat: bool, outcome: str) -> web.Response:
        """A non-streamed answer: one JSON body with the usage (a cut or stall drops the connection instead)."""
        if outcome in ("cut", "stall"):
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        text = "".join(ANSWER)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        usage = {"prompt_tokens": 11, "completion_tokens": len(ANSWER), "total_tokens": 11 + len(ANSWER)}
        answer = {
            "id": "prov-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": usage,
        }
        return web.json_response(answer)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> FakeProvider:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _error(
    status: int, message: str, kind: str, code: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)
