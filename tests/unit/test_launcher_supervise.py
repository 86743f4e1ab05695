"""`modelfleet up` once the stack is ready: a child that exits is reported and
restarted with backoff, or stops the stack (tiny stand-in processes, no model)."""

from __future__ import annotations

import io
import sys

from modelfleet.dataplane.launcher import Child, Stack, _popen, describe_exit, free_port, supervise

FAST = {"poll_s": 0.01, "backoff_s": 0.01, "backoff_max_s": 0.05}


def child(name: str, code: str) -> Child:
    cmd = [sys.executable, "-c", code]
    return Child(name, f"http://127.0.0.1:{free_port()}", _popen(cmd, {}), cmd, {})


def test_exit_status_is_described():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-15) == "was killed by SIGTERM"


def test_never_stops_the_stack_at_the_first_exit():
    stack = Stack([child("d/engine-0", "import sys; sys.exit(3)"), child("gateway", "import time; time.sleep(30)")])
    out = io.StringIO()
    try:
        assert supervise(stack, out, restart="never", **FAST) == 1
    finally:
        stack.stop(5)
    assert f"d/engine-0 (pid {stack.children[0].proc.pid}) exited with code 3 after 0 s; stopping" in out.getvalue()
    assert stack.children[0].restarts == 0


def test_a_crashing_child_is_restarted_with_backoff_then_gives_up():
    stack = Stack([child("d/engine-1", "import sys; sys.exit(1)"), child("gateway", "import time; time.sleep(30)")])
    out = io.StringIO()
    try:
        assert supervise(stack, out, max_failures=3, **FAST) == 1
    finally:
        stack.stop(5)
    text = out.getvalue()
    crashing, steady = stack.children
    assert crashing.restarts == 3 and steady.restarts == 0
    assert text.count("exited with code 1 after 0 s; restarting it in") == 3
    assert "d/engine-1: restarted (pid" in text and "restart 3)" in text
    assert text.rstrip().endswith("failed 4 times in a row within 60 s of starting; stopping")


def test_a_child_that_ran_long_enough_starts_its_backoff_over(tmp_path):
    marker = tmp_path / "ran-once"
    # the first run lasts 0.3 s (longer than stable_after_s), every later one exits at once
    code = (
        f"import os, sys, time\nif not os.path.exists({str(marker)!r}):\n"
        f"    time.sleep(0.3); open({str(marker)!r}, 'w').close()\nsys.exit(1)"
    )
    stack = Stack([child("d/sidecar-0", code)])
    crashing = stack.children[0]
    crashing.failures_in_a_row = 7  # an old streak: forgotten because the run was long enough
    out = io.StringIO()
    try:
        assert supervise(stack, out, stable_after_s=0.2, max_failures=2, **FAST) == 1
    finally:
        stack.stop(5)
    assert crashing.restarts == 2  # long run: 1 in a row; then 2; the third quick exit passes the limit
    assert out.getvalue().rstrip().endswith("failed 3 times in a row within 0.2 s of starting; stopping")
