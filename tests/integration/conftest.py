"""A real `modelfleet up` on a free loopback port, shared by the integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from modelfleet.dataplane.launcher import free_port
from tests.metrics_text import series_value

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = Path(__file__).with_name("manifests.yaml")


def descendants(pid: int) -> set[int]:
    """Every live descendant of pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_is_free(port: int) -> bool:
    """Nothing listens on the port (connections left in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    port: int
    log: Path
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: object) -> openai.OpenAI:
        """An openai client for this stack; closed (with its pooled sockets) when the stack stops."""
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_stack(
    manifest: Path, tmp: Path, timeout: float = 300, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Stack:
    """``env`` adds variables for the launcher, which passes its environment on to every role;
    ``args`` adds flags of ``modelfleet up``."""
    port = free_port()
    log = tmp / f"up-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet.dataplane.cli",
                "up",
                "-f",
                str(manifest),
                "--port",
                str(port),
                *(args or []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            text=True,
        )
    stack = Stack(proc, port, log)
    deadline = time.monotonic() + timeout
    while "Ready: " not in stack.output():
        if proc.poll() is not None:
            raise AssertionError(f"modelfleet up exited with {proc.returncode}:\n{stack.output()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(30)
            raise AssertionError(f"modelfleet up not ready after {timeout} s:\n{stack.output()[-4000:]}")
        time.sleep(0.2)
    return stack


def stop_stack(stack: Stack, timeout: float = 30) -> set[int]:
    """SIGTERM the launcher; returns the descendants that were alive before."""
    for client in stack.clients:
        client.close()
    before = descendants(stack.proc.pid)
    stack.proc.send_signal(signal.SIGTERM)
    try:
        stack.proc.wait(timeout)
    except subprocess.TimeoutExpired:  # reap it either way: a launcher left running outlives the test run
        stack.proc.kill()
        stack.proc.wait(30)
        raise AssertionError(
            f"modelfleet up did not stop within {timeout} s of SIGTERM:\n{stack.output()[-4000:]}"
        ) from None
    return before


@pytest.fixture(scope="package")  # stopped before the e2e tests start: they want the cores
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(MANIFEST, tmp_path_factory.mktemp("stack"))
    yield s
    if s.proc.poll() is None:
        stop_stack(s)


def engine_url(stack: Stack, deployment: str) -> str:
    for line in stack.output().splitlines():
        if f"engine {deployment}/0 listening on" in line:
            return "http://" + line.rsplit(" ", 1)[1]
    raise AssertionError("engine address not in the launcher log")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


def metric(url: str, series: str) -> float:
    """One series of url's /metrics: ``name`` or ``name{label="value"}``, matched exactly (tests/metrics_text.py)."""
    status, text = get(url + "/metrics")
    assert status == 200, text
    return series_value(text, series)
