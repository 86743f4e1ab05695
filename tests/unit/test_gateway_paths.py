"""The gateway's answers that need no replica: unknown model, no ready replica,
and Docker Model Runner's /engines/... paths (FastAPI's in-process client)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from modelfleet.dataplane.gateway.api import create_app
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable
from modelfleet.dataplane.launcher import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def client():
    table = RoutingTable(
        [
            DeploymentRoute(name="down", models=["m", "alias"], endpoints=[]),
            DeploymentRoute(name="gone", models=["gone"], endpoints=[f"http://127.0.0.1:{free_port()}"]),
        ]
    )
    with TestClient(create_app(table)) as c:
        yield c


@pytest.mark.parametrize(
    "path", ["/v1/models", "/engines/v1/models", "/engines/llama.cpp/v1/models", "/engines/torch/v1/models"]
)
def test_models_on_every_path(client, path):
    resp = client.get(path)
    assert resp.status_code == 200
    assert [m["id"] for m in resp.json()["data"]] == ["m", "alias", "gone"]


@pytest.mark.parametrize(
    "prefix", ["", "/engines", "/engines/llama.cpp", "/engines/vllm", "/engines/mlx", "/engines/torch"]
)
def test_unknown_model_is_404_on_every_path(client, prefix):
    resp = client.post(prefix + "/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("prefix", ["", "/engines", "/engines/llama.cpp"])
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_no_ready_replica_is_503_with_retry_after(client, prefix, endpoint):
    body = CHAT if "chat" in endpoint else {"model": "alias", "prompt": "hi", "max_tokens": 4}
    resp = client.post(prefix + endpoint, json=body)
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["type"] == "service_unavailable"
    assert "no ready replica" in resp.json()["error"]["message"]


def test_unreachable_replica_is_503_with_retry_after(client):
    resp = client.post("/engines/v1/chat/completions", json={**CHAT, "model": "gone"})
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1


@pytest.mark.parametrize("method,path", [("get", "/models"), ("post", "/chat/completions"), ("post", "/completions")])
def test_unknown_engine_is_404_naming_it(client, method, path):
    resp = client.request(method, "/engines/ollama/v1" + path, json={"not": "a valid body"})
    assert resp.status_code == 404  # before the body is looked at
    err = resp.json()["error"]
    assert err["code"] == "engine_not_found" and err["type"] == "not_found_error"
    assert "'ollama'" in err["message"] and "llama.cpp" in err["message"]
