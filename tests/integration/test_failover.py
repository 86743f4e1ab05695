"""Failover through the real stack: two replicas of the real model behind two
sidecars, one engine SIGKILLed under load, the official openai client.

Every request either completes or ends with an explicit error (an HTTP error
status, or an SSE error event the openai client raises as APIError); none
hangs and no stream ends without a finish reason. Requests that had not
streamed a byte are retried on the live replica; the sidecars eject the dead
one, the launcher restarts it, and the sidecars re-admit it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, alive, get, metric, start_stack, stop_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-failover"
MAX_TOKENS = 32
TOPICS = [
    "the sea",
    "a cat",
    "Paris",
    "winter",
    "a robot",
    "bread",
    "the moon",
    "a train",
    "rain",
    "a dog",
    "tea",
    "a map",
]


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # the restart waits 8 s, so the test sees the sidecars eject the dead engine before it is back
    s = start_stack(
        Path(__file__).with_name("failover.yaml"), tmp_path_factory.mktemp("failover"), args=["--restart-backoff", "8"]
    )
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def children(stack: Stack) -> dict[str, tuple[int, str]]:
    """name -> (pid, url), from the launcher's start-up lines (``  failover/engine-1: pid 123, http://...``)."""
    found = re.findall(r"^  (\S+): pid (\d+), (http://\S+)$", stack.output(), re.M)
    return {name: (int(pid), url) for name, pid, url in found}


def sidecar_view(url: str) -> dict[str, bool]:
    """engine url -> healthy, as one sidecar sees its replicas."""
    _, text = get(url + "/readyz")
    return {r["url"]: r["healthy"] for r in json.loads(text)["replicas"]}


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.1)


def replicas_serving(stack: Stack, path: str, requests: int = 8) -> set[str]:
    """The replicas (x-modelfleet-replica) that answered ``requests`` short completions, each a 200."""
    served = set()
    for _ in range(requests):
        resp = httpx.post(stack.base_url + path, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2}, timeout=60)
        assert resp.status_code == 200, resp.text
        served.add(resp.headers["x-modelfleet-replica"])
    return served


def ask(client: openai.OpenAI, i: int, started: threading.Event | None = None) -> dict[str, Any]:
    """Request i (even: streaming, odd: not) as the client sees it: completed, or the error it raised."""
    kw: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
    )
    text: list[str] = []
    finish = None
    try:
        if i % 2:
            reply = client.chat.completions.create(**kw)
            text.append(reply.choices[0].message.content or "")
            finish = reply.choices[0].finish_reason
        else:
            for chunk in client.chat.completions.create(stream=True, **kw):
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                    if started is not None and "".join(text):
                        started.set()
    except openai.APIStatusError as exc:  # an HTTP error status before the first byte
        return {"i": i, "outcome": "error", "status": exc.status_code, "code": (exc.body or {}).get("code")}
    except openai.APIError as exc:  # an SSE error event after the first byte
        body = exc.body if isinstance(exc.body, dict) else {}
        return {"i": i, "outcome": "error", "status": None, "code": body.get("code"), "text": "".join(text)}
    return {"i": i, "outcome": "done" if finish else "truncated", "finish": finish, "text": "".join(text)}


def test_replicas_start_behind_every_sidecar(failover):
    kids = children(failover)
    engines = sorted(url for name, (_, url) in kids.items() if "/engine-" in name)
    sidecars = [url for name, (_, url) in kids.items() if "/sidecar-" in name]
    assert sorted(kids) == [
        "failover/engine-0",
        "failover/engine-1",
        "failover/sidecar-0",
        "failover/sidecar-1",
        "gateway",
    ]
    for sidecar in sidecars:  # every sidecar knows every engine of its deployment, all ready
        assert sidecar_view(sidecar) == dict.fromkeys(engines, True)
    assert replicas_serving(failover, "/v1/completions") == {"0", "1"}  # the requests spread over both engines


def test_killing_a_replica_under_load_fails_nothing_silently(failover):
    kids = children(failover)
    victim_pid, victim = kids["failover/engine-1"]
    sidecars = [url for name, (_, url) in kids.items() if "/sidecar-" in name]
    retried = sum(metric(s, 'modelfleet_sidecar_retries_total{reason="connect"}') for s in sidecars)
    client = failover.client(timeout=120)

    streaming = [threading.Event() for _ in range(0, len(TOPICS), 2)]
    with ThreadPoolExecutor(len(TOPICS)) as pool:
        futures = [pool.submit(ask, client, i, streaming[i // 2] if i % 2 == 0 else None) for i in range(len(TOPICS))]
        # kill once the victim decodes and streams have begun, but long before 32 tokens are out
        wait_for(lambda: metric(victim, "modelfleet_engine_running_requests") >= 2, 60, "load on the victim")
        wait_for(lambda: sum(e.is_set() for e in streaming) >= 3, 60, "streams started")
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        after = [pool.submit(ask, client, i) for i in range(4)]  # sent after the kill
        # every sidecar ejects the dead replica: at once if a request finds it gone, else after
        # three failed health checks (2 s apart), in any case before the launcher restarts it
        wait_for(lambda: all(not sidecar_view(s)[victim] for s in sidecars), 7.5, "victim ejected by every sidecar")
        results = [f.result(timeout=150) for f in futures]
        later = [f.result(timeout=150) for f in after]
    assert time.monotonic() - killed < 150  # nothing hung

    for r in results + later:
        assert r["outcome"] != "truncated", f"a stream ended without a finish reason or an error: {r}"
        if r["outcome"] == "done":
            assert r["finish"] == "length" and r["text"], r
    errors = [r for r in results if r["outcome"] == "error"]
    for r in errors:  # only streams that were already under way may fail, and they say so
        assert r["i"] % 2 == 0 and r["status"] is None and r["code"] == "upstream_failed", r
    assert len(errors) <= 4  # at most the victim's decode slots (maxNumSeqs)
    assert [r["outcome"] for r in later] == ["done"] * 4, later
    # requests in flight on the victim that had not streamed a byte were retried, not failed
    assert all(r["outcome"] == "done" for r in results if r["i"] % 2), results
    assert sum(metric(s, 'modelfleet_sidecar_retries_total{reason="connect"}') for s in sidecars) > retried
    assert not alive(victim_pid)

    # the launcher says what happened and starts the engine again; the sidecars re-admit it
    wait_for(lambda: "failover/engine-1: ready again" in failover.output(), 90, "engine restarted")
    log = failover.output()
    assert re.search(
        rf"failover/engine-1 \(pid {victim_pid}\) was killed by SIGKILL after \d+ s; restarting it in 8 s", log
    )
    assert re.search(r"failover/engine-1: restarted \(pid \d+, restart 1\)", log)
    wait_for(lambda: all(all(sidecar_view(s).values()) for s in sidecars), 10, "victim re-admitted")
    assert replicas_serving(failover, "/engines/v1/completions") == {"0", "1"}
    # the policy came from the manifest's spec.routing
    for sidecar in sidecars:
        routed = [
            line for line in get(sidecar + "/metrics")[1].splitlines() if line.startswith("modelfleet_sidecar_routed")
        ]
        assert routed and all('policy="RoundRobin"' in line for line in routed), routed
    assert failover.proc.poll() is None  # the stack stayed up throughout
