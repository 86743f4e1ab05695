"""`modelfleet gateway --api-keys` as a process: no key material in its whole log,
and `modelfleet up` saying whether it runs open (no model is loaded)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from modelfleet.dataplane import cli
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutesFile
from modelfleet.dataplane.launcher import free_port, gateway_auth
from tests.integration.test_gateway_auth import (
    ADMIN,
    KEY_A,
    KEY_B,
    KEY_NEW,
    KEYS,
    MESSAGES,
    ROOT,
    SECRETS,
    metrics_text,
    write_keys,
)


def test_no_key_material_in_the_gateway_process_log(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    write_keys(keys, KEYS)
    admin = tmp_path / "admin"
    admin.write_text(ADMIN)
    routes = tmp_path / "routes.json"
    down = f"http://127.0.0.1:{free_port()}"
    routes.write_text(
        RoutesFile(deployments=[DeploymentRoute(name="d", models=["big"], endpoints=[down])]).model_dump_json()
    )
    port = free_port()
    log = tmp_path / "gateway.log"
    cmd = [sys.executable, "-m", "modelfleet.dataplane.cli", "gateway", "--routes", str(routes), "--port", str(port)]
    cmd += ["--api-keys", str(keys), "--admin-token", str(admin), "--log-level", "DEBUG"]
    env = {**os.environ, "MODELFLEET_AUTH_RELOAD_INTERVAL_S": "0.1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        sync = openai.OpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0)
        with sync:
            with pytest.raises(openai.InternalServerError):  # admitted, and no replica answers
                sync.chat.completions.create(model="big", messages=MESSAGES)
            for key in (KEY_B, ADMIN, KEY_NEW):
                with pytest.raises((openai.AuthenticationError, openai.PermissionDeniedError)):
                    sync.with_options(api_key=key).chat.completions.create(model="big", messages=MESSAGES)
        assert metrics_text(base, ADMIN)[0] == 200
        assert metrics_text(base, KEY_A)[0] == 401
        # a bad file with a key in it, then a valid rotation: both are logged
        write_keys(keys, f"keys:\n  - name: x\n    key: {KEY_NEW}\n   models: [oops\n")
        wait_for_log(log, "not reloading")
        write_keys(keys, f"keys: [{{name: rotated, key: {KEY_NEW}, models: '*'}}]\n")
        wait_for_log(log, "key(s): rotated")
    finally:
        proc.terminate()
        proc.wait(20)
    text = log.read_text()
    assert "the gateway is OPEN" not in text
    assert "not reloading" in text and "rotated" in text, text
    for secret in [*SECRETS, hashlib.sha256(KEY_B.encode()).hexdigest()]:
        assert secret not in text, f"key material in the gateway log:\n{text}"


def wait_for_log(log: Path, text: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout_s} s:\n{log.read_text()}"
        time.sleep(0.05)


def test_up_says_when_it_runs_open_and_refuses_a_bad_keys_file(tmp_path: Path, capsys) -> None:
    args, line = gateway_auth(None, None)
    assert args == [] and "auth: OPEN" in line and "--api-keys FILE" in line
    keys = tmp_path / "keys.yaml"
    write_keys(keys, KEYS)
    args, line = gateway_auth(keys, None)
    assert args == ["--api-keys", str(keys.resolve())] and "API keys required: 2 key(s)" in line
    write_keys(keys, f"keys: [{{name: a, key: {KEY_A}}}]")
    manifest = ROOT / "tests" / "integration" / "manifests.yaml"
    status = cli.main(["up", "-f", str(manifest), "--port", str(free_port()), "--api-keys", str(keys)])
    err = capsys.readouterr().err
    assert status == 1 and "keys[0].models" in err and KEY_A not in err
