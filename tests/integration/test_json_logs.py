"""``--log-format json``: one JSON object per line, carrying the request id (issue #9, item 6).

A real gateway (``--log-format json``) in front of a real sidecar
(``MODELFLEET_LOG_FORMAT=json``) whose only replica refuses connections: the
request fails with 503, and the gateway logs the sidecar's refusal while
handling it, so that line must carry the request's id, the client's or the one
the gateway generated. No model is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelfleet.dataplane.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "TOP-SECRET-PROMPT-TEXT"
API_KEY = "sk-live-SECRET-KEY-123"


def _lines(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))  # every line is one JSON object
    return out


@pytest.fixture
def roles(tmp_path: Path):
    sport, gport, dead = free_port(), free_port(), free_port()
    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps({"deployments": [{"name": "d", "models": ["m"], "endpoints": [f"http://127.0.0.1:{sport}"]}]})
    )
    cli = [sys.executable, "-m", "modelfleet.dataplane.cli"]
    logs = {"sidecar": tmp_path / "sidecar.log", "gateway": tmp_path / "gateway.log"}
    commands = {
        "sidecar": [
            *cli,
            "sidecar",
            "--deployment",
            "d",
            "--peer",
            f"http://127.0.0.1:{dead}",
            "--port",
            str(sport),
            "--log-level",
            "DEBUG",
        ],
        "gateway": [*cli, "gateway", "--routes", str(routes), "--port", str(gport), "--log-format", "json"],
    }
    procs = []
    for role, command in commands.items():
        with logs[role].open("wb") as out:
            env = {**os.environ, "MODELFLEET_LOG_FORMAT": "json"} if role == "sidecar" else dict(os.environ)
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
    url = f"http://127.0.0.1:{gport}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert all(p.poll() is None for p in procs), {r: f.read_text()[-2000:] for r, f in logs.items()}
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.2)
        yield url, logs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)


def test_json_log_lines_carry_the_request_id_and_no_secrets(roles):
    url, logs = roles
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
    auth = {"authorization": f"Bearer {API_KEY}"}
    sent = httpx.post(url + "/v1/chat/completions", json=body, headers={"x-request-id": "req-json-logs-1", **auth})
    assert sent.status_code == 503
    generated = httpx.post(url + "/v1/chat/completions", json=body, headers=auth)
    assert generated.status_code == 503
    deadline = time.monotonic() + 10
    while not (
        '"req-json-logs-1"' in logs["gateway"].read_text()
        and re.search(r'"request_id": ?"[0-9a-f]{32}"', logs["gateway"].read_text())
    ):  # both requests' lines have reached the file
        assert time.monotonic() < deadline, logs["gateway"].read_text()[-2000:]
        time.sleep(0.05)

    gateway = _lines(logs["gateway"])
    sidecar = _lines(logs["sidecar"])
    for line in gateway + sidecar:
        assert {"ts", "level", "role", "logger", "message"} <= set(line), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["ts"])), line
    assert {line["role"] for line in gateway} == {"gateway"}
    assert {line["role"] for line in sidecar} == {"sidecar"}
    ids = [line.get("request_id") for line in gateway]
    assert "req-json-logs-1" in ids, gateway
    assert any(isinstance(i, str) and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), gateway  # generated
    everything = logs["gateway"].read_text() + logs["sidecar"].read_text()
    assert PROMPT not in everything
    assert API_KEY not in everything
