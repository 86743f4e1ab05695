"""The gateway's answers that need no replica: unknown model, no ready replica,
and Docker Model Runner's /engines/... paths (aiohttp's in-process test client)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.dataplane.gateway.api import create_app
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable
from modelfleet.dataplane.launcher import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
async def client():
    table = RoutingTable(
        [
            DeploymentRoute(name="down", models=["m", "alias"], endpoints=[]),
            DeploymentRoute(name="gone", models=["gone"], endpoints=[f"http://127.0.0.1:{free_port()}"]),
        ]
    )
    async with TestClient(TestServer(create_app(table))) as c:
        yield c


@pytest.mark.parametrize(
    "path", ["/v1/models", "/engines/v1/models", "/engines/llama.cpp/v1/models", "/engines/torch/v1/models"]
)
async def test_models_on_every_path(client, path):
    resp = await client.get(path)
    assert resp.status == 200
    assert [m["id"] for m in (await resp.json())["data"]] == ["m", "alias", "gone"]


@pytest.mark.parametrize(
    "prefix", ["", "/engines", "/engines/llama.cpp", "/engines/vllm", "/engines/mlx", "/engines/torch"]
)
async def test_unknown_model_is_404_on_every_path(client, prefix):
    resp = await client.post(prefix + "/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("prefix", ["", "/engines", "/engines/llama.cpp"])
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
async def test_no_ready_replica_is_503_with_retry_after(client, prefix, endpoint):
    body = CHAT if "chat" in endpoint else {"model": "alias", "prompt": "hi", "max_tokens": 4}
    resp = await client.post(prefix + endpoint, json=body)
    assert resp.status == 503
    assert int(resp.headers["retry-after"]) >= 1
    assert (await resp.json())["error"]["type"] == "service_unavailable"
    assert "no ready replica" in (await resp.json())["error"]["message"]


async def test_unreachable_replica_is_503_with_retry_after(client):
    resp = await client.post("/engines/v1/chat/completions", json={**CHAT, "model": "gone"})
    assert resp.status == 503
    assert int(resp.headers["retry-after"]) >= 1


@pytest.mark.parametrize("method,path", [("get", "/models"), ("post", "/chat/completions"), ("post", "/completions")])
async def test_unknown_engine_is_404_naming_it(client, method, path):
    resp = await client.request(method, "/engines/ollama/v1" + path, json={"not": "a valid body"})
    assert resp.status == 404  # before the body is looked at
    err = (await resp.json())["error"]
    assert err["code"] == "engine_not_found" and err["type"] == "not_found_error"
    assert "'ollama'" in err["message"] and "llama.cpp" in err["message"]


async def test_error_metrics_name_the_deployment_the_request_was_for(client):
    """A refusal after the model resolved counts under its deployment; only an unknown model counts as none."""
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 503  # deployment "down": no replica
    assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "gone"})).status == 503
    assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})).status == 404
    text = await (await client.get("/metrics")).text()
    counts = {
        (s.labels["deployment"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "modelfleet_gateway_requests"
        for s in family.samples
        if s.name == "modelfleet_gateway_requests_total" and s.labels["endpoint"] == "/v1/chat/completions"
    }
    assert counts == {("down", "503"): 1.0, ("gone", "503"): 1.0, ("none", "404"): 1.0}
