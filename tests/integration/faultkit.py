"""Processes and clients shared by the drain and fault tests (test_drain.py, test_faults_*.py).

Roles run as real ``modelfleet`` processes on free loopback ports, in front of
``slow_upstream.py`` (a fake engine whose streams stay in flight) or the real
model. Every request is classified the way a client would see it, so a test
can assert that nothing is lost silently: ``done`` (a finish reason and
``[DONE]``), ``error`` (an SSE error event), ``refused`` (an HTTP error status),
or ``lost`` (the stream ended or broke with neither: always a defect).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelfleet.dataplane.launcher import free_port
from tests.integration.conftest import ROOT, get


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)


@dataclass
class Fleet:
    """The processes one test started; every one is killed at the end, whatever happened."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int | None = None) -> Proc:
        port = port or free_port()
        log = self.tmp / f"{name}-{port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log.open("wb") as out:
            popen = subprocess.Popen(
                # a module name runs with -m, a file by its path (neither puts the repo root on sys.path)
                [sys.executable, *(argv if argv[0].endswith(".py") else ["-m", *argv]), "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=full_env,
            )
        proc = Proc(name, popen, port, log)
        self.procs.append(proc)
        return proc

    def upstream(self, interval: float = 0.05, model: str = "slow") -> Proc:
        """A fake engine (slow_upstream.py): one chunk every ``interval`` seconds."""
        argv = [str(Path(__file__).with_name("slow_upstream.py")), "--interval", str(interval), "--model", model]
        return self.spawn("upstream", argv)

    def sidecar(self, peers: list[str], *, shutdown_s: float = 10, policy: str = "LeastOutstanding") -> Proc:
        argv = ["modelfleet.dataplane.cli", "sidecar", "--deployment", "d", "--policy", policy]
        for peer in peers:
            argv += ["--peer", peer]
        return self.spawn("sidecar", argv, {"MODELFLEET_SHUTDOWN_TIMEOUT_S": str(shutdown_s)})

    def gateway(self, sidecars: list[str], *, model: str = "slow", shutdown_s: float = 10) -> Proc:
        routes = self.tmp / f"routes-{len(self.procs)}.json"
        routes.write_text(json.dumps({"deployments": [{"name": "d", "models": [model], "endpoints": sidecars}]}))
        argv = ["modelfleet.dataplane.cli", "gateway", "--routes", str(routes)]
        return self.spawn("gateway", argv, {"MODELFLEET_SHUTDOWN_TIMEOUT_S": str(shutdown_s)})

    def wait_ready(self, *procs: Proc, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            while get_status(proc.url + "/readyz") != 200:
                if proc.popen.poll() is not None:
                    raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-3000:]}")
                assert time.monotonic() < deadline, f"{proc.name} not ready after {timeout} s:\n{proc.output()[-3000:]}"
                time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                with_cont(proc)
                proc.popen.kill()
            proc.popen.wait(10)


def with_cont(proc: Proc) -> None:
    """A stopped (SIGSTOP) process must be continued before it can die of SIGKILL's cleanup."""
    with contextlib.suppress(ProcessLookupError):
        proc.signal(signal.SIGCONT)


def running_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The body of a test module's ``fleet`` fixture (``yield from running_fleet(tmp_path)``)."""
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def get_status(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


def chat_body(model: str, tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": tokens,
        "stream": stream,
        **extra,
    }


def chat(
    base_url: str,
    body: dict[str, Any],
    started: threading.Event | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """One chat completion as a client sees it (see the module docstring); ``started``: set at the first chunk."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"chunks": 0, "finish": None, "done": False, "code": None}
    try:
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=timeout) as resp:
            out["status"] = resp.status_code
            if resp.status_code != 200:
                resp.read()
                err = resp.json().get("error", {})
                out.update(outcome="refused", code=err.get("code"), retry_after=resp.headers.get("retry-after"))
                return out
            if not body.get("stream"):
                reply = json.loads(resp.read())
                out.update(outcome="done" if reply["choices"][0]["finish_reason"] else "lost", done=True)
                return out
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out["code"] = event["error"].get("code")
                    continue
                for choice in event.get("choices", []):
                    out["chunks"] += 1
                    out["finish"] = choice.get("finish_reason") or out["finish"]
                    if started is not None:
                        started.set()
    except httpx.HTTPError as exc:  # the connection broke with no word: a silent loss
        out.update(outcome="lost", exc=type(exc).__name__)
        return out
    finally:
        out["elapsed"] = time.monotonic() - t0
    if out["code"] is not None and out["done"]:
        out["outcome"] = "error"
    elif out["finish"] and out["done"]:
        out["outcome"] = "done"
    else:
        out["outcome"] = "lost"
    return out


def assert_nothing_lost(results: list[dict[str, Any]]) -> None:
    """Every request completed, or said explicitly that it did not."""
    lost = [r for r in results if r["outcome"] == "lost"]
    assert not lost, f"requests lost silently: {lost}"
    for r in results:
        if r["outcome"] == "refused":
            assert r["status"] >= 400 and r["code"], r


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout} s"
        time.sleep(interval)
    return time.monotonic() - t0
