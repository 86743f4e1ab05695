"""Fault suite, data plane without a model (docs/reliability.md): real gateway and sidecar processes
in front of fake engines (slow_upstream.py) on loopback, faults injected by signals and by a TCP proxy
(tcp_proxy.py) between two hops.

Each test asserts that no request is lost silently (every one completes, is
retried, or ends with an explicit error: an HTTP error status or an SSE error
event; faultkit.chat classifies them) and that service recovers within the
bound stated by its constant. Killing an engine with the real model is in
test_faults_engine.py and test_failover.py.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import get
from tests.integration.faultkit import (
    Fleet,
    assert_nothing_lost,
    chat,
    chat_body,
    running_fleet,
    wait_for,
    with_cont,
)
from tests.integration.tcp_proxy import FaultProxy

pytestmark = pytest.mark.slow

# A sidecar is SIGKILLed: the gateway retries a refused connection on the next sidecar at once,
# so a new request succeeds this soon after the kill (one connect attempt on loopback plus the stream).
SIDECAR_KILL_RECOVERY_S = 2.0
# An engine is stalled (SIGSTOP): the sidecar ejects it after three failed health checks, each up to
# its 2 s timeout with 2 s between them; from then on new requests go to the live engine only.
STALL_EJECT_S = 14.0
# Once the stalled engine is ejected, a short request (4 chunks, 0.2 s) through the sidecar finishes within this.
STALLED_NEW_REQUEST_BOUND_S = 2.0
# After SIGCONT the sidecar has the engine healthy again within this bound (checks every 0.5 s while one is down).
STALL_READMIT_S = 5.0
# A link that resets every request is healed: the sidecar re-admits the engine behind it in this bound.
LINK_RECOVERY_S = 8.0
# The delaying link adds this much to every chunk from the engine.
LINK_DELAY_S = 0.2


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from running_fleet(tmp_path)


def sidecar_view(url: str) -> dict[str, bool]:
    """engine url -> healthy, as the sidecar sees its replicas."""
    _, text = get(url + "/readyz")
    return {r["url"]: r["healthy"] for r in json.loads(text)["replicas"]}


def test_killing_a_sidecar_mid_stream(fleet: Fleet) -> None:
    """Streams through the dead sidecar end with an SSE error event; every other request completes."""
    engines = [fleet.upstream(interval=0.05), fleet.upstream(interval=0.05)]
    fleet.wait_ready(*engines)
    sidecars = [fleet.sidecar([e.url for e in engines]) for _ in range(2)]
    fleet.wait_ready(*sidecars)
    gateway = fleet.gateway([s.url for s in sidecars])
    fleet.wait_ready(gateway)
    started = [threading.Event() for _ in range(8)]
    with ThreadPoolExecutor(12) as pool:
        # 60 chunks at 0.05 s: 3 s each, the gateway spreads them over both sidecars
        futures = [pool.submit(chat, gateway.url, chat_body("slow", 60), ev) for ev in started]
        wait_for(lambda: all(ev.is_set() for ev in started), 30, "streams started")
        sidecars[1].signal(signal.SIGKILL)
        killed = time.monotonic()
        first = chat(gateway.url, chat_body("slow", 2))
        recovered = time.monotonic() - killed
        after = [pool.submit(chat, gateway.url, chat_body("slow", 4)) for _ in range(4)]
        results = [f.result(60) for f in futures]
        later = [f.result(60) for f in after]
    assert first["outcome"] == "done", first
    assert recovered < SIDECAR_KILL_RECOVERY_S, recovered
    assert_nothing_lost(results + later)
    errors = [r for r in results if r["outcome"] == "error"]
    assert all(r["code"] == "upstream_failed" and r["chunks"] > 0 for r in errors), errors
    assert 1 <= len(errors) <= 4, results  # the dead sidecar's share, no more
    assert [r["outcome"] for r in later] == ["done"] * 4, later
    assert sidecars[0].popen.poll() is None and gateway.popen.poll() is None


def test_stalling_an_engine_delays_but_loses_nothing(fleet: Fleet) -> None:
    """SIGSTOP one engine mid-stream, SIGCONT it later: its requests wait and then complete, new work goes
    elsewhere once the sidecar ejects it, and it is re-admitted after it resumes."""
    stalled, live = fleet.upstream(interval=0.05), fleet.upstream(interval=0.05)
    fleet.wait_ready(stalled, live)
    sidecar = fleet.sidecar([stalled.url, live.url])
    fleet.wait_ready(sidecar)
    started = [threading.Event() for _ in range(6)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(chat, sidecar.url, chat_body("slow", 40), ev) for ev in started]
        wait_for(lambda: all(ev.is_set() for ev in started), 30, "streams started")
        stalled.signal(signal.SIGSTOP)
        try:
            # requests sent before the ejection may land on the stalled engine: they must wait, not vanish
            during = [pool.submit(chat, sidecar.url, chat_body("slow", 4)) for _ in range(4)]
            wait_for(lambda: not sidecar_view(sidecar.url)[stalled.url], STALL_EJECT_S, "stalled engine ejected")
            after = [chat(sidecar.url, chat_body("slow", 4)) for _ in range(3)]
        finally:
            with_cont(stalled)
        resumed = time.monotonic()
        results = [f.result(60) for f in futures + during]
    assert_nothing_lost(results + after)
    assert [r["outcome"] for r in results] == ["done"] * len(results), results  # the stalled ones resumed
    assert any(r["elapsed"] > 5 for r in results)  # some really waited for the stalled engine
    assert all(r["outcome"] == "done" and r["elapsed"] < STALLED_NEW_REQUEST_BOUND_S for r in after), after
    wait_for(lambda: all(sidecar_view(sidecar.url).values()), STALL_READMIT_S, "stalled engine re-admitted")
    assert time.monotonic() - resumed < STALL_READMIT_S + 1
    assert chat(sidecar.url, chat_body("slow", 2))["outcome"] == "done"


def test_a_delaying_link_slows_streams_but_loses_none(fleet: Fleet) -> None:
    engine = fleet.upstream(interval=0.01)
    fleet.wait_ready(engine)
    proxy = FaultProxy(engine.port).start()
    try:
        sidecar = fleet.sidecar([proxy.url])
        fleet.wait_ready(sidecar)
        fast = chat(sidecar.url, chat_body("slow", 10))
        proxy.delay_s = LINK_DELAY_S
        with ThreadPoolExecutor(4) as pool:
            slow = list(pool.map(lambda _: chat(sidecar.url, chat_body("slow", 10)), range(4)))
    finally:
        proxy.stop()
    assert_nothing_lost([fast, *slow])
    assert all(r["outcome"] == "done" and r["chunks"] == 10 for r in [fast, *slow]), slow
    assert all(r["elapsed"] >= LINK_DELAY_S for r in slow), slow  # the delay was really on the path


def test_a_dropping_link_is_retried_or_reported_and_heals(fleet: Fleet) -> None:
    """Sidecar -> engine through a proxy that resets requests, then cuts streams, then heals."""
    flaky_engine, engine = fleet.upstream(interval=0.05), fleet.upstream(interval=0.05)
    fleet.wait_ready(flaky_engine, engine)
    proxy = FaultProxy(flaky_engine.port).start()
    try:
        sidecar = fleet.sidecar([proxy.url, engine.url], policy="RoundRobin")
        fleet.wait_ready(sidecar)
        # connections reset before any response byte: the sidecar retries on the other engine
        proxy.reset_requests = True
        with ThreadPoolExecutor(8) as pool:
            reset = list(pool.map(lambda _: chat(sidecar.url, chat_body("slow", 10)), range(8)))
        assert [r["outcome"] for r in reset] == ["done"] * 8, reset
        assert proxy.dropped > 0  # some really went through the proxy
        # heal, wait for re-admission, then cut streams 300 bytes in: those clients get an error event
        proxy.heal()
        took = wait_for(lambda: all(sidecar_view(sidecar.url).values()), LINK_RECOVERY_S, "link healed")
        dropped = proxy.dropped
        proxy.cut_streams_after = 300
        with ThreadPoolExecutor(8) as pool:
            cut = list(pool.map(lambda _: chat(sidecar.url, chat_body("slow", 20)), range(8)))
        assert proxy.dropped > dropped
        proxy.heal()
        healed = [chat(sidecar.url, chat_body("slow", 5)) for _ in range(4)]
    finally:
        proxy.stop()
    assert_nothing_lost(reset + cut + healed)
    errors = [r for r in cut if r["outcome"] == "error"]
    assert errors and all(r["code"] == "upstream_failed" for r in errors), cut
    assert [r["outcome"] for r in healed] == ["done"] * 4, healed
    assert took < LINK_RECOVERY_S
