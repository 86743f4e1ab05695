"""Gateway API keys through the real gateway app, with the openai client.

The gateway (create_app, on an aiohttp test server) relays to a fake sidecar on
loopback that answers with a fixed usage, so no model is needed: 401/403/429
reach the client as openai's AuthenticationError / PermissionDeniedError /
RateLimitError, the keys file reloads while the gateway runs, /metrics needs
the admin token and /healthz does not. test_gateway_auth_process.py runs
`modelfleet gateway` as a process and reads its whole log for key material.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from modelfleet.dataplane.gateway.api import create_app
from modelfleet.dataplane.gateway.auth import AuthConfig
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable

ROOT = Path(__file__).resolve().parents[2]
KEY_A = "sk-team-alpha-6f1d2c9e8b7a"
KEY_B = "sk-team-bravo-3c4d5e6f7a8b"
KEY_NEW = "sk-rotated-in-9a8b7c6d5e4f"
ADMIN = "admin-token-1a2b3c4d5e6f7a8b"
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
SECRETS = [KEY_A, KEY_B, KEY_NEW, ADMIN]


def write_keys(path: Path, text: str) -> None:
    """Write and move the mtime on, so a poll sees the change even within one clock tick."""
    path.write_text(text)
    stamp = time.time() + 2
    os.utime(path, (stamp, stamp))


KEYS = f"""
keys:
  - name: team-a
    key: {KEY_A}
    models: "*"
    requestsPerMinute: 3
  - name: team-b
    key: sha256:{hashlib.sha256(KEY_B.encode()).hexdigest()}
    models: [small]
    maxConcurrent: 1
    tokensPerMinute: 600
"""


class FakeSidecar:
    """Answers chat completions with fixed usage; requests whose user is 'hold' wait for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            assert "authorization" not in request.headers and "x-api-key" not in request.headers
            if body.get("user") == "hold":
                self.arrived.set()
                await self.release.wait()
            choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            if not body.get("stream"):
                return web.json_response(
                    {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"]}
                    | {"choices": [choice], "usage": USAGE}
                )
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            delta = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
            await resp.write(
                b"data: " + json.dumps(base | {"choices": [delta]}, separators=(",", ":")).encode() + b"\n\n"
            )
            await resp.write(
                b"data: " + json.dumps(base | {"choices": [], "usage": USAGE}, separators=(",", ":")).encode() + b"\n\n"
            )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[FakeSidecar, str]]:
    fake = FakeSidecar()
    server = TestServer(fake.app())
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    fake.release.set()
    await server.close()


@pytest.fixture
async def gateway(tmp_path: Path, sidecar: tuple[FakeSidecar, str]) -> AsyncIterator[tuple[str, Path, FakeSidecar]]:
    fake, url = sidecar
    keys = tmp_path / "keys.yaml"
    write_keys(keys, KEYS)
    admin = tmp_path / "admin-token"
    admin.write_text(ADMIN + "\n")
    table = RoutingTable(
        [
            DeploymentRoute(name="small", models=["small"], endpoints=[url]),
            DeploymentRoute(name="big", models=["big"], endpoints=[url]),
        ]
    )
    app = create_app(table, auth_config=AuthConfig(keys, admin, reload_interval_s=0.05))
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), keys, fake
    await server.close()


def client(base: str, key: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, **kw)  # type: ignore[arg-type]


MESSAGES = [{"role": "user", "content": "hello"}]


async def test_keys_models_and_limits_reach_the_openai_client(gateway) -> None:
    base, _, _ = gateway
    async with client(base, KEY_A) as a, client(base, "sk-not-a-key-000000000") as wrong:
        answer = await a.chat.completions.create(model="big", messages=MESSAGES)
        assert answer.choices[0].message.content == "hi"
        with pytest.raises(openai.AuthenticationError) as exc:
            await wrong.chat.completions.create(model="big", messages=MESSAGES)
        assert exc.value.code == "invalid_api_key"
        assert "sk-not-a-key" not in str(exc.value.body)
        await a.chat.completions.create(model="big", messages=MESSAGES, stream=False)
        await a.chat.completions.create(model="small", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as limited:  # team-a: 3 requests a minute
            await a.chat.completions.create(model="big", messages=MESSAGES)
        assert limited.value.code == "rate_limit_exceeded"
        assert "requests per minute" in limited.value.message
        assert int(limited.value.response.headers["retry-after"]) >= 1

    async with client(base, KEY_B) as b:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await b.chat.completions.create(model="big", messages=MESSAGES)
        assert denied.value.code == "model_not_allowed" and "'big'" in denied.value.message
        assert [m.id async for m in b.models.list()] == ["small"]


async def test_missing_key_and_the_other_headers(gateway) -> None:
    base, _, _ = gateway
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/v1/models") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_api_key" and "Missing API key" in error["message"]
        for header in ("api-key", "x-api-key"):
            async with http.get(base + "/v1/models", headers={header: KEY_A}) as resp:
                assert resp.status == 200
                assert {m["id"] for m in (await resp.json())["data"]} == {"small", "big"}


async def test_concurrency_and_tokens_per_minute(gateway) -> None:
    base, _, fake = gateway
    async with client(base, KEY_B) as b:
        held = asyncio.create_task(b.chat.completions.create(model="small", messages=MESSAGES, user="hold"))
        await asyncio.wait_for(fake.arrived.wait(), 10)
        with pytest.raises(openai.RateLimitError) as exc:
            await b.chat.completions.create(model="small", messages=MESSAGES)
        assert "concurrent requests" in exc.value.message
        fake.release.set()
        await held
        # 600 tokens a minute: the up-front charge of max_tokens=400 fits once, then the usage (10) is
        # what counts, so the next one fits again; max_tokens=590 then does not.
        for _ in range(2):
            stream = await b.chat.completions.create(model="small", messages=MESSAGES, max_tokens=400, stream=True)
            assert [c async for c in stream]
        with pytest.raises(openai.RateLimitError) as exc:
            await b.chat.completions.create(model="small", messages=MESSAGES, max_tokens=590)
        assert "tokens per minute" in exc.value.message


def metrics_text(base: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=headers), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


async def test_metrics_need_the_admin_token_and_health_is_open(gateway) -> None:
    base, _, _ = gateway
    async with client(base, KEY_A) as a:
        await a.chat.completions.create(model="big", messages=MESSAGES)
    async with client(base, ADMIN) as admin_as_key:
        with pytest.raises(openai.AuthenticationError):  # the admin token is no API key
            await admin_as_key.models.list()
    loop = asyncio.get_running_loop()
    for token in (None, KEY_A):  # no token, or an API key: refused
        status, body = await loop.run_in_executor(None, metrics_text, base, token)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_admin_token"
    status, text = await loop.run_in_executor(None, metrics_text, base, ADMIN)
    assert status == 200
    assert 'modelfleet_gateway_key_requests_total{key="team-a",status="200"} 1.0' in text
    assert 'modelfleet_gateway_key_prompt_tokens_total{key="team-a"} 7.0' in text
    assert 'modelfleet_gateway_key_completion_tokens_total{key="team-a"} 3.0' in text
    assert 'modelfleet_gateway_auth_refused_total{key="none",reason="invalid_key"} 1.0' in text
    assert 'reason="invalid_admin_token"' in text
    assert not any(secret in text for secret in SECRETS)
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(base + path) as resp:
                assert resp.status == 200


async def test_the_keys_file_reloads_while_the_gateway_runs(gateway, caplog) -> None:
    base, keys, _ = gateway
    async with client(base, KEY_A) as a, client(base, KEY_NEW) as new:
        await a.models.list()
        write_keys(keys, f"keys: [{{name: rotated, key: {KEY_NEW}, models: '*'}}]\n")
        deadline = time.monotonic() + 5
        while True:
            try:
                await new.models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "the new key was not loaded"
                await asyncio.sleep(0.05)
        with pytest.raises(openai.AuthenticationError):
            await a.models.list()
        write_keys(keys, "keys: [{name: broken}]\n")  # a bad file: the previous keys stay
        deadline = time.monotonic() + 5
        while not any("not reloading the gateway's keys" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the bad keys file was not read"
            await asyncio.sleep(0.05)
        await new.models.list()  # the gateway has read the bad file: the key it replaced is still in force


async def test_an_open_gateway_needs_no_key(tmp_path: Path, sidecar) -> None:
    _, url = sidecar
    server = TestServer(create_app(RoutingTable([DeploymentRoute(name="small", models=["small"], endpoints=[url])])))
    await server.start_server()
    try:
        async with client(str(server.make_url("")).rstrip("/"), "anything") as anyone:
            assert (await anyone.chat.completions.create(model="small", messages=MESSAGES)).choices
    finally:
        await server.close()
