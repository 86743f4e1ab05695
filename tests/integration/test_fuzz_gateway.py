"""Schemathesis against the gateway's own OpenAPI document (issue #9, item 5).

What runs: a real ``modelfleet gateway --routes FILE`` in front of a real
``modelfleet sidecar`` (policy PrefixAffinity, so the sidecar parses every
prompt it forwards) whose one peer is ``bench/fake_upstream.py``, a real
OpenAI-compatible HTTP server that answers at once. Why not the shared
``stack`` fixture: the model engine answers a completion in tens to hundreds of
milliseconds and its start takes seconds; thousands of generated requests
through it would take minutes and measure the model, not the gateway. The
gateway and sidecar code under test is the same either way.

What is asserted, for every generated case: no 5xx, every 4xx body is the
OpenAI error shape ``{"error": {"message": str, "type": str, "param": str |
None, "code": str | None}}``, and the status is one the document lists for the
operation (the document used to promise FastAPI's 422, which the gateway never
sends: it answers 400). Cases come from the document at ``/openapi.json``
(schemathesis: schema-conforming and schema-violating bodies for every
operation), with the ``model`` field swapped for a routed model id half of the
time so requests also travel the forwarding path, plus raw bytes under random
content types for every POST route.

Size: ``MODELFLEET_FUZZ_EXAMPLES`` examples per operation and generation mode
(default 250: 2,254 cases, about 20-40 s on 2 shared cores, the same cases
every run so ``make test`` is repeatable); ``make fuzz`` runs 1,000 per
operation and mode (about 9,000 cases) with new random seeds each time. The
totals are printed at the end (``-s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from modelfleet.dataplane.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("MODELFLEET_FUZZ_EXAMPLES", "250"))
RANDOM = os.environ.get("MODELFLEET_FUZZ_RANDOM") == "1"  # make fuzz: new cases every run
MODEL = "fake"  # served by the fake upstream through the sidecar

pytestmark = pytest.mark.slow


@dataclass
class Gateway:
    url: str
    logs: list[Path]
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})


def _wait_chat(url: str, procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float = 60) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise AssertionError(f"{log.name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(url + "/v1/chat/completions", body, {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("gateway -> sidecar -> fake upstream never answered a chat completion")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fuzz")
    fport, sport, gport = free_port(), free_port(), free_port()
    cli = [sys.executable, "-m", "modelfleet.dataplane.cli"]
    routes = tmp / "routes.json"
    routes.write_text(
        json.dumps({"deployments": [{"name": "fake", "models": [MODEL], "endpoints": [f"http://127.0.0.1:{sport}"]}]})
    )
    logs = [tmp / "upstream.log", tmp / "sidecar.log", tmp / "gateway.log"]
    procs = [
        _spawn(
            [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(fport), "--chunks", "4"], logs[0]
        ),
        _spawn(
            [
                *cli,
                "sidecar",
                "--deployment",
                "fake",
                "--peer",
                f"http://127.0.0.1:{fport}",
                "--policy",
                "PrefixAffinity",
                "--port",
                str(sport),
            ],
            logs[1],
        ),
        _spawn([*cli, "gateway", "--routes", str(routes), "--port", str(gport)], logs[2]),
    ]
    try:
        url = f"http://127.0.0.1:{gport}"
        _wait_chat(url, procs, logs)
        yield Gateway(url, logs)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def error_shape_problem(body: bytes) -> str | None:
    """None when ``body`` is an OpenAI error object, else what is wrong with it."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
        return f"not {{'error': {{...}}}}: {body[:200]!r}"
    err: dict[str, Any] = doc["error"]
    if not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"message and type must be strings: {err}"
    if "param" not in err or "code" not in err:
        return f"param and code must be present: {err}"
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return f"param and code must be strings or null: {err}"
    return None


def check(gw: Gateway, what: str, status: int, body: bytes, documented: set[str] | None = None) -> None:
    """No 5xx; a 4xx in the OpenAI shape; ``documented``: the status codes the operation's document lists."""
    gw.statuses[status] += 1
    problem = f"answered {status}" if status >= 500 else None
    if 400 <= status < 500:
        problem = error_shape_problem(body)
    if problem is None and documented is not None and str(status) not in documented:
        problem = f"answered {status}, which the OpenAPI document does not list ({sorted(documented)})"
    if problem is not None:
        gw.failures.append(f"{what}: {problem}")
        raise AssertionError(f"{what}: {problem}")


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
    )


def fuzz_operation(
    gateway: Gateway, session: requests.Session, op: Any, mode: GenerationMode, documented: set[str], examples: int
) -> None:
    what = f"{op.method.upper()} {op.path} ({mode.value})"

    @_settings(examples)
    @given(case=op.as_strategy(generation_mode=mode), routed=st.booleans())
    def run(case: Any, routed: bool) -> None:
        if routed and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # reach the sidecar and the upstream, not only model_not_found
        resp = case.call(base_url=gateway.url, session=session, timeout=10)
        check(gateway, f"{what} body={str(case.body)[:300]}", resp.status_code, resp.content, documented)

    run()


def test_gateway_survives_generated_requests(gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    paths = requests.get(gateway.url + "/openapi.json", timeout=10).json()["paths"]
    operations = [result.ok() for result in schema.get_all_operations()]
    posts = sorted(op.path for op in operations if op.method.upper() == "POST")
    assert posts == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"], posts
    session = requests.Session()
    started = time.monotonic()

    for op in operations:
        has_body = op.method.upper() == "POST"
        documented = set(paths[op.path][op.method.lower()]["responses"])
        # an operation without inputs has one request to make
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_body else (GenerationMode.POSITIVE,):
            fuzz_operation(gateway, session, op, mode, documented, EXAMPLES if has_body else 1)

    # bytes schemathesis never sends: broken JSON, non-objects, odd content types
    @_settings(EXAMPLES)
    @given(
        path=st.sampled_from([*posts, "/engines/v1/chat/completions", "/engines/llama.cpp/v1/completions"]),
        body=st.one_of(
            st.binary(max_size=300),
            st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999", b'{"model":', b"{}", b'{"model":"fake"}']),
            st.builds(lambda s: json.dumps({"model": MODEL, "stream": True, "messages": s}).encode(), st.text()),
        ),
        content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]),
    )
    def raw(path: str, body: bytes, content_type: str) -> None:
        headers = {"content-type": content_type} if content_type else {}
        resp = session.post(gateway.url + path, data=body, headers=headers, timeout=10)
        what = f"POST {path} raw={body[:200]!r} content-type={content_type!r}"
        documented = set(paths[path]["post"]["responses"]) if path in paths else None
        check(gateway, what, resp.status_code, resp.content, documented)

    raw()
    session.close()
    total = sum(gateway.statuses.values())
    seconds = time.monotonic() - started
    print(f"\nfuzz: {total} cases in {seconds:.1f} s; statuses {dict(sorted(gateway.statuses.items()))}")
    assert not gateway.failures
    assert gateway.statuses[200] > 0, "no generated request reached the fake upstream"
    assert total >= 8 * EXAMPLES
