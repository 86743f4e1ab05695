"""A fast fake OpenAI-compatible upstream: a benchmark instrument, not a model server.

``bench/router_overhead.py`` puts it behind each router so that what is
measured is the router, not a model. It answers at once, with no model and no
waiting:

- ``POST /v1/chat/completions`` and ``POST /v1/completions``: with
  ``"stream": true`` a fixed number of SSE chunks (``--chunks``, default 16,
  one short word each), then the usage event when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``; the whole
  stream is written in one go. Without ``stream`` one JSON completion.
- ``GET /v1/models``, ``/health``, ``/healthz``, ``/readyz``, ``/health_generate``,
  ``/liveness``, ``/readiness``, ``/get_model_info``, ``/get_server_info``,
  ``/server_info``, ``/model_info``, ``/load``, ``/get_load``, ``/metrics``, ``/version``: the small answers
  the routers under test (ModelFleet's sidecar, sglang-router, vllm-router) ask
  workers for when they register them and while health-checking them.

It is a hand-written HTTP/1.1 server on a plain asyncio Protocol (keep-alive,
Content-Length request bodies; chunked responses for streams) because a full
framework would make the instrument, which shares the CPU with everything else,
cost more than the routers it measures.

    .venv/bin/python bench/fake_upstream.py --port 9001 [--chunks 16] [--model fake]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

MODEL = "fake"


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(message: str, kind: str) -> bytes:
    """An error body in the full OpenAI shape (the gateway relays it as is; tests check the shape)."""
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}})


class Answers:
    """Every response body, built once: the server only picks one per request."""

    def __init__(self, model: str, chunks: int, port: int) -> None:
        created = int(time.time())
        self.model = model
        self.chunks = chunks
        words = [f" w{i}" for i in range(chunks)]
        self.stream: dict[tuple[str, bool], bytes] = {}
        self.whole: dict[str, bytes] = {}
        usage = {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}
        for kind in ("chat", "text"):
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            events = []
            for i, word in enumerate(words):
                if kind == "chat":
                    delta: dict[str, object] = {"content": word}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice: dict[str, object] = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": word, "finish_reason": None}
                if i == chunks - 1:
                    choice["finish_reason"] = "length"
                events.append({"id": "fake-1", "object": obj, "created": created, "model": model, "choices": [choice]})
            plain = b"".join(b"data: " + _json(e) + b"\n\n" for e in events)
            usage_event = _json(
                {"id": "fake-1", "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            )
            done = b"data: [DONE]\n\n"
            self.stream[(kind, False)] = plain + done
            self.stream[(kind, True)] = plain + b"data: " + usage_event + b"\n\n" + done
            text = "".join(words)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length"}
            self.whole[kind] = _json(
                {"id": "fake-1", "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}
            )
        models = {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "bench"}]}
        info = {
            "model_path": model,
            "tokenizer_path": model,
            "is_generation": True,
            "served_model_name": model,
            "max_model_len": 2048,
            "max_total_num_tokens": 262144,
        }
        self.get: dict[str, bytes] = {
            "/v1/models": _json(models),
            "/health": b"{}",
            "/healthz": _json({"status": "alive"}),
            "/readyz": _json({"status": "ready"}),
            "/health_generate": b"{}",
            "/liveness": b"{}",
            "/readiness": b"{}",
            "/ping": b"{}",
            "/version": _json({"version": "0.0.0-bench"}),
            "/get_model_info": _json(info),
            "/model_info": _json(info),
            "/get_server_info": _json({**info, "port": port, "dp_size": 1, "tp_size": 1}),
            "/server_info": _json({**info, "port": port, "dp_size": 1, "tp_size": 1}),
            "/load": _json({"load": 0}),
            "/get_load": _json([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]),
            "/metrics": b"",
        }


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _chunked_sse(body: bytes) -> bytes:
    """The SSE stream as one chunk per event (as a real server flushes them), already complete."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    parts = [head]
    for event in body.split(b"\n\n")[:-1]:
        event += b"\n\n"
        parts.append(b"%x\r\n%s\r\n" % (len(event), event))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


class Server(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection are answered in order."""

    answers: Answers
    wire: dict[object, bytes]  # cached complete responses
    log_requests = False

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            request_line = lines[0].split(" ")
            if len(request_line) != 3:  # not HTTP/1.x (sglang-router probes with an HTTP/2 preface first)
                assert self.transport is not None
                self.transport.close()
                return
            method, target, _ = request_line
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(self.answer(method, target.split("?", 1)[0], body))
            if close:
                self.transport.close()
                return

    def answer(self, method: str, path: str, body: bytes) -> bytes:
        a = self.answers
        if self.log_requests:
            print(f"{method} {path} {body[:200]!r}", file=sys.stderr, flush=True)
        if method == "GET":
            found = a.get.get(path)
            if found is None:
                return _response(404, _error(f"no {path}", "not_found_error"))
            key: object = ("get", path)
            if key not in self.wire:
                ctype = "text/plain" if path == "/metrics" else "application/json"
                self.wire[key] = _response(200, found, ctype)
            return self.wire[key]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                return _response(400, _error("bad JSON", "invalid_request_error"))
            kind = "chat" if path == "/v1/chat/completions" else "text"
            if req.get("stream"):
                usage = bool((req.get("stream_options") or {}).get("include_usage"))
                key = (kind, usage)
                if key not in self.wire:
                    self.wire[key] = _chunked_sse(a.stream[(kind, usage)])
                return self.wire[key]
            key = ("whole", kind)
            if key not in self.wire:
                self.wire[key] = _response(200, a.whole[kind])
            return self.wire[key]
        return _response(404, _error(f"no {method} {path}", "not_found_error"))


async def serve(host: str, port: int, chunks: int, model: str, log_requests: bool = False) -> None:
    Server.answers = Answers(model, chunks, port)
    Server.wire = {}
    Server.log_requests = log_requests
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake upstream on http://{host}:{port} (pid {os.getpid()})", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=16, help="content events per stream")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--log-requests", action="store_true", help="print every request line (debugging)")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.chunks, args.model, args.log_requests))


if __name__ == "__main__":
    main()
