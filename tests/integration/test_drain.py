"""Graceful drain of every serving role (dataplane/httpserver.py ``serve()``; docs/reliability.md).

Each test SIGTERMs a real process while a slow stream runs through it and
checks what a client and the layer above see: ``/readyz`` answers 503
``draining`` at once, a new request is refused with a retriable 503 and
``Retry-After`` in the OpenAI error shape, the stream in flight completes with
``[DONE]``, and the process exits 0 within its grace period. A stream still
running at the deadline ends with an SSE error event, never a silent cut.
The engine's test uses the real model (test_faults_engine.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.faultkit import Fleet, Proc, chat, chat_body, get_status, running_fleet, wait_for

# SIGTERM to /readyz 503: the signal handler runs on the next loop turn (1 s: slack for 2 loaded cores,
# far below the 5 s readiness probe period)
READY_FLIP_BOUND_S = 1.0
# after the stream ends: cleanup contexts close their sessions and the process exits
EXIT_BOUND_S = 5.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from running_fleet(tmp_path)


def refused_while_draining(url: str, body: dict[str, Any]) -> None:
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    err = resp.json()["error"]
    assert err["type"] == "service_unavailable" and err["code"] == "draining" and err["message"], err


def drain_while_streaming(victim: Proc, entry: str, body: dict[str, Any], grace_s: float) -> dict[str, Any]:
    """SIGTERM ``victim`` once a stream through ``entry`` has begun; checks readyz, refusal and exit."""
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(chat, entry, body, started)
        assert started.wait(60), "the stream did not start"
        victim.signal(signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: get_status(victim.url + "/readyz") == 503, READY_FLIP_BOUND_S, "readyz 503 after SIGTERM")
        assert httpx.get(victim.url + "/readyz", timeout=5).json()["status"] == "draining"
        assert httpx.get(victim.url + "/healthz", timeout=5).status_code == 200  # alive: no liveness restart
        refused_while_draining(victim.url, {**body, "max_tokens": 2})
        result = stream.result(timeout=grace_s + 30)
    rc = victim.popen.wait(grace_s + EXIT_BOUND_S)
    assert rc == 0, victim.output()[-3000:]
    assert time.monotonic() - sent < grace_s + EXIT_BOUND_S
    assert "draining" in victim.output()
    return result


def test_sidecar_finishes_its_stream_and_exits_0(fleet: Fleet) -> None:
    up = fleet.upstream(interval=0.05)
    fleet.wait_ready(up)
    sidecar = fleet.sidecar([up.url], shutdown_s=10)
    fleet.wait_ready(sidecar)
    result = drain_while_streaming(sidecar, sidecar.url, chat_body("slow", 40), grace_s=10)
    assert result["outcome"] == "done" and result["chunks"] == 40 and result["finish"] == "length", result


def test_gateway_finishes_its_stream_and_exits_0(fleet: Fleet) -> None:
    up = fleet.upstream(interval=0.05)
    fleet.wait_ready(up)
    sidecar = fleet.sidecar([up.url])
    fleet.wait_ready(sidecar)
    gateway = fleet.gateway([sidecar.url], shutdown_s=10)
    fleet.wait_ready(gateway)
    result = drain_while_streaming(gateway, gateway.url, chat_body("slow", 40), grace_s=10)
    assert result["outcome"] == "done" and result["chunks"] == 40 and result["finish"] == "length", result
    assert sidecar.popen.poll() is None  # the layer below is untouched


def test_a_stream_past_the_deadline_ends_with_an_error_event(fleet: Fleet) -> None:
    up = fleet.upstream(interval=0.1)
    fleet.wait_ready(up)
    sidecar = fleet.sidecar([up.url], shutdown_s=1)
    fleet.wait_ready(sidecar)
    # 200 chunks at 0.1 s: 20 s, far past the sidecar's 1 s grace
    result = drain_while_streaming(sidecar, sidecar.url, chat_body("slow", 200), grace_s=1)
    assert result["outcome"] == "error" and result["code"] == "shutdown", result
    assert 0 < result["chunks"] < 200 and result["done"], result
    assert "grace period over" in sidecar.output()


def test_the_gateway_retries_a_draining_sidecar_elsewhere(fleet: Fleet) -> None:
    """The layer above sees the refusal as retriable: a gateway in front of two sidecars loses nothing."""
    up = fleet.upstream(interval=0.05)
    fleet.wait_ready(up)
    draining, other = fleet.sidecar([up.url], shutdown_s=10), fleet.sidecar([up.url])
    fleet.wait_ready(draining, other)
    gateway = fleet.gateway([draining.url, other.url])
    fleet.wait_ready(gateway)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(chat, draining.url, chat_body("slow", 60), started)  # keeps it draining a while
        assert started.wait(30)
        draining.signal(signal.SIGTERM)
        wait_for(lambda: get_status(draining.url + "/readyz") == 503, READY_FLIP_BOUND_S, "draining")
        # the gateway's rotation sends every other request to the draining sidecar first
        results = [chat(gateway.url, chat_body("slow", 3)) for _ in range(6)]
        assert long.result(60)["outcome"] == "done"
    assert [r["outcome"] for r in results] == ["done"] * 6, results
    assert draining.popen.wait(15) == 0
