"""A slow fake engine for the drain and fault tests: an OpenAI-compatible server with no model.

``POST /v1/chat/completions`` answers ``max_tokens`` chunks (default 8), one
every ``--interval`` seconds: as SSE with ``"stream": true`` (then
``data: [DONE]``), else one JSON completion once they are all "generated".
``/readyz``, ``/healthz``, ``/load`` and ``/v1/models`` answer what a sidecar
asks an engine. Unlike ``bench/fake_upstream.py``, which writes a whole stream
at once, a stream here stays in flight long enough to be interrupted.

    python -m tests.integration.slow_upstream --port 9001 [--interval 0.05] [--model slow]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

MODEL = "slow"


def _chunk(model: str, i: int, n: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": "length" if i == n - 1 else None}
    event = {"id": "slow-1", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    return b"data: " + json.dumps({**event, "choices": [choice]}).encode() + b"\n\n"


def build_app(model: str, interval: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 8)
        if not body.get("stream"):
            await asyncio.sleep(n * interval)
            text = "".join(f" t{i}" for i in range(n))
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            return web.json_response(
                {"id": "slow-1", "object": "chat.completion", "created": 0, "model": model, "choices": [choice]}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(n):
            await asyncio.sleep(interval)
            await resp.write(_chunk(model, i, n))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"running": 0, "queued": 0, "ready": True})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "test"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/load", load)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--model", default=MODEL)
    args = p.parse_args()
    web.run_app(build_app(args.model, args.interval), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
