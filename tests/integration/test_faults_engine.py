"""Drain and fault tests of an engine with the real model (SmolLM2, few tokens), behind a real sidecar.

- drain: SIGTERM an engine while it streams: readyz 503 ``draining`` at once,
  new work refused with a retriable 503, the stream completes, exit 0
  (the same checks as every other role in test_drain.py);
- kill: SIGKILL the only engine under load: streams under way end with an SSE
  error event, requests that had not started and new ones get an HTTP 503
  with Retry-After (there is no other replica to retry on), and once the
  engine is started again the sidecar serves within the stated bound.
  Two replicas, where the sidecar retries on the live one, are test_failover.py,
  whose deployment and client helpers this module reuses.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.integration.faultkit import Fleet, Proc, chat, chat_body, get_status, running_fleet, wait_for
from tests.integration.test_drain import drain_while_streaming
from tests.integration.test_failover import MODEL, ask

pytestmark = [pytest.mark.model, pytest.mark.slow]

MANIFEST = Path(__file__).with_name("failover.yaml")
# the engine is started again (as the launcher or the kubelet would) and loads the model from the
# converted-weights cache (about 11 s on 2 shared cores); the sidecar checks every 0.5 s while it is down
ENGINE_RESTART_RECOVERY_S = 60.0
GRACE_S = 60.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from running_fleet(tmp_path)


def engine(fleet: Fleet, port: int | None = None, grace_s: float = GRACE_S) -> Proc:
    argv = ["modelfleet.dataplane.cli", "engine", "-f", str(MANIFEST), "--deployment", "failover"]
    proc = fleet.spawn("engine", argv, {"MODELFLEET_SHUTDOWN_TIMEOUT_S": str(grace_s)}, port=port)
    fleet.wait_ready(proc, timeout=180)
    return proc


def test_engine_finishes_its_stream_and_exits_0(fleet: Fleet) -> None:
    eng = engine(fleet)
    body = chat_body(MODEL, 24, temperature=0, ignore_eos=True)
    result = drain_while_streaming(eng, eng.url, body, grace_s=GRACE_S)
    assert result["outcome"] == "done" and result["finish"] == "length", result


def test_killing_the_only_engine_mid_stream(fleet: Fleet) -> None:
    eng = engine(fleet)
    sidecar = fleet.sidecar([eng.url])
    fleet.wait_ready(sidecar)
    client = openai.OpenAI(base_url=sidecar.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    streaming = [threading.Event() for _ in range(3)]
    try:
        with ThreadPoolExecutor(6) as pool:
            # even i: streams (3 of them), odd i: whole answers; maxNumSeqs 4, so some wait in the queue
            futures = [pool.submit(ask, client, i, streaming[i // 2] if i % 2 == 0 else None) for i in range(6)]
            wait_for(lambda: all(e.is_set() for e in streaming), 120, "streams started", interval=0.1)
            eng.signal(signal.SIGKILL)
            killed = time.monotonic()
            results = [f.result(timeout=60) for f in futures]
        down = chat(sidecar.url, chat_body(MODEL, 2))
    finally:
        client.close()
    assert time.monotonic() - killed < 60  # nothing hung
    for r in results:  # completed, or an explicit error: never a stream cut without a word
        assert r["outcome"] in ("done", "error"), r
    streams = [r for r in results if r["i"] % 2 == 0]
    cut = [r for r in streams if r["outcome"] == "error"]
    assert cut and all(r["code"] == "upstream_failed" for r in cut), streams  # a stream may have finished first
    for r in results:
        if r["i"] % 2 and r["outcome"] == "error":  # not started: an HTTP error status, retriable
            assert r["status"] in (502, 503), r
    # with the engine gone, a new request is refused in words, with a hint to retry
    assert down["outcome"] == "refused" and down["status"] == 503 and down["retry_after"], down

    restarted = time.monotonic()
    engine(fleet, port=eng.port)  # started again on its address
    wait_for(
        lambda: chat(sidecar.url, chat_body(MODEL, 2))["outcome"] == "done",
        ENGINE_RESTART_RECOVERY_S,
        "the sidecar serves again",
        interval=0.5,
    )
    assert time.monotonic() - restarted < ENGINE_RESTART_RECOVERY_S
    assert get_status(sidecar.url + "/readyz") == 200
