"""dataplane/logs.py: the JSON line format, the request-id context, the format switch."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelfleet.dataplane.httpserver import error_middleware
from modelfleet.dataplane.logs import MAX_REQUEST_ID, REQUEST_ID, JsonFormatter, log_format


def _record(message: str = "hello %s", args: tuple[object, ...] = ("world",)) -> logging.LogRecord:
    return logging.LogRecord("modelfleet.x", logging.WARNING, __file__, 1, message, args, None)


def test_json_line_has_the_fields_and_the_request_id_when_known():
    formatter = JsonFormatter("gateway")
    line = json.loads(formatter.format(_record()))
    assert line["level"] == "WARNING" and line["role"] == "gateway" and line["logger"] == "modelfleet.x"
    assert line["message"] == "hello world" and line["ts"].endswith("Z")
    assert "request_id" not in line
    token = REQUEST_ID.set("abc")
    try:
        assert json.loads(formatter.format(_record()))["request_id"] == "abc"
    finally:
        REQUEST_ID.reset(token)


def test_format_from_flag_then_environment(monkeypatch):
    monkeypatch.delenv("MODELFLEET_LOG_FORMAT", raising=False)
    assert log_format(None) == "text"
    monkeypatch.setenv("MODELFLEET_LOG_FORMAT", "JSON")
    assert log_format(None) == "json"
    assert log_format("text") == "text"
    monkeypatch.setenv("MODELFLEET_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log format"):
        log_format(None)


async def test_middleware_scopes_the_request_id_to_its_request():
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(REQUEST_ID.get())
        return web.Response(text="ok")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        await client.get("/", headers={"x-request-id": "r1"})
        await client.get("/")  # same keep-alive connection: the previous id must not leak
        await client.get("/", headers={"x-request-id": "x" * 1000})
    assert seen == ["r1", None, "x" * MAX_REQUEST_ID]
    assert REQUEST_ID.get() is None
