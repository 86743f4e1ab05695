"""Run `modelfleet operator` as a real process against the test control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from e2e.cluster import ControlPlane

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"operator exited ({self.proc.returncode}) before logging {text!r}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"operator did not log {text!r} in {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_operator(cluster: ControlPlane, log: Path, env: Mapping[str, str] | None = None) -> OperatorProcess:
    """Start the operator with the admin kubeconfig (tests of RBAC pass their own env)."""
    full_env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PYTHONUNBUFFERED": "1",
        # pods on kwok nodes have fake addresses: never scrape them from a test
        "MODELFLEET_OPERATOR_METRICS_INTERVAL_S": "0",
        "MODELFLEET_OPERATOR_HEALTH_PORT": "0",
        **(env or {}),
    }
    with log.open("ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.dataplane.cli", "operator"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
    return OperatorProcess(proc, log)


def running_operator(
    cluster: ControlPlane, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """A module fixture's body: kopf's peering CRDs, an operator that has started peering, stopped after."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peerings.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    op = start_operator(cluster, log, env)
    op.wait_for_log("peering", 60)
    yield op
    op.stop()
    print(op.output()[-5000:])
