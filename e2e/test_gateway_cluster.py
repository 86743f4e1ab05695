"""The gateway in cluster mode builds its routes from InferenceDeployments on a real API server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from e2e.cluster import free_port

pytestmark = pytest.mark.k8s


def test_gateway_routes_from_the_cluster(crd, namespace, tmp_path):
    doc = {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "routed"},
        "spec": {
            "model": {"name": "routed-model", "aliases": ["rm"], "source": {"path": "/m"}},
            "runtime": {"kind": "torch", "device": "cpu"},
        },
    }
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(crd.kubeconfig), "MODELFLEET_REFRESH_INTERVAL_S": "0.5"}
    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.dataplane.cli", "gateway", "--kubernetes", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        ids: set[str] = set()
        while time.monotonic() < deadline:
            try:
                ids = {m["id"] for m in httpx.get(base + "/v1/models", timeout=2).json()["data"]}
            except httpx.HTTPError:
                ids = set()
            if {"routed-model", "rm"} <= ids:
                break
            time.sleep(0.3)
        assert {"routed-model", "rm"} <= ids, log.read_text()
        body = {"model": "rm", "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
        assert resp.status_code == 503  # known model, no ready replica yet
        assert resp.headers["retry-after"]
        assert resp.json()["error"]["code"] == "no_ready_replica"
        missing = httpx.post(base + "/v1/chat/completions", json={**body, "model": "nope"}, timeout=10)
        assert missing.status_code == 404
    finally:
        proc.terminate()
        proc.wait(20)
