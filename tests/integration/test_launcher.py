"""`modelfleet up` leaves nothing behind: no child process, no bound port."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import alive, descendants, port_is_free, start_stack, stop_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

ONE = Path(__file__).resolve().parents[2] / "examples" / "smollm2-local.yaml"


def test_sigterm_stops_every_child_and_frees_the_port(tmp_path):
    stack = start_stack(ONE, tmp_path)
    children = descendants(stack.proc.pid)
    assert len(children) >= 3  # engine, sidecar, gateway
    stop_stack(stack)
    assert stack.proc.returncode == 0
    assert not [p for p in children if alive(p)]
    assert port_is_free(stack.port)
    assert "stopped" in stack.output()


def test_children_die_with_a_killed_launcher(tmp_path):
    stack = start_stack(ONE, tmp_path)
    children = descendants(stack.proc.pid)
    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in children if alive(p)]:
        time.sleep(0.2)
    assert not [p for p in children if alive(p)]


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "modelfleet.dataplane.cli", "up", "-f", str(ONE), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in out.stdout + out.stderr


def test_invalid_manifest_names_the_field(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(ONE.read_text().replace("maxNumSeqs: 8", "maxNumSeqs: 0"))
    out = subprocess.run(
        [sys.executable, "-m", "modelfleet.dataplane.cli", "up", "-f", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "spec.engine.maxNumSeqs" in out.stderr
