"""Fault suite, control plane (docs/reliability.md): the test control plane's kube-apiserver process
is stopped and started again under a running operator, which must keep reconciling without a restart
of its own; then the operator is stopped with SIGTERM, kopf's graceful stop, and exits 0.

Killing the operator mid-reconcile is test_operator_lifecycle.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import ControlPlane
from e2e.external import ExternalCluster
from e2e.operator_process import start_operator

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
SPEC: dict[str, Any] = {
    "model": {"name": "m", "source": {"path": "/models/m"}},
    "runtime": {"kind": "torch", "device": "cpu"},
    "replicas": 1,
}
# how long the API server stays down: kopf's watches and the peering keep-alive fail meanwhile
APISERVER_DOWN_S = 5.0
# once it answers again, kopf's watches reconnect (their backoff is short) and the operator
# reconciles a new resource and a changed one within this bound
APISERVER_RECOVERY_S = 30.0
# SIGTERM: kopf stops its watches, lets running handlers finish, withdraws its peering record, exits
OPERATOR_STOP_S = 20.0


def cr(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": {**SPEC, "replicas": replicas},
    }


def deployment(k8s: ControlPlane, ns: str, name: str) -> dict[str, Any] | None:
    out = k8s.kubectl("get", "deployment", name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_the_operator_keeps_reconciling_across_an_api_server_restart(crd, gpu_nodes, namespace, tmp_path):
    k8s = crd
    if isinstance(k8s, ExternalCluster):
        pytest.skip("the API server of an external cluster cannot be restarted from a test")
    k8s.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peerings.yaml"))
    k8s.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    # the highest priority: a stale peering record of another test's operator never pauses this one
    op = start_operator(k8s, tmp_path / "operator.log", env={"MODELFLEET_OPERATOR_PRIORITY": str(2**31 - 1)})
    down = recovered = float("nan")
    try:
        op.wait_for_log("peering", 60)
        k8s.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(cr("before")))
        k8s.wait_for("children of before", lambda: deployment(k8s, namespace, "before"), 60)

        down = k8s.restart_apiserver(down_s=APISERVER_DOWN_S)
        back = time.monotonic()
        assert op.proc.poll() is None, f"the operator died with the API server:\n{op.output()[-3000:]}"
        k8s.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(cr("after")))
        k8s.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(cr("before", replicas=2)))
        k8s.wait_for(
            "children of a resource created after the restart",
            lambda: deployment(k8s, namespace, "after"),
            APISERVER_RECOVERY_S,
        )
        k8s.wait_for(
            "a change made after the restart applied",
            lambda: (deployment(k8s, namespace, "before") or {}).get("spec", {}).get("replicas") == 2,
            APISERVER_RECOVERY_S,
        )
        recovered = time.monotonic() - back
        assert recovered < APISERVER_RECOVERY_S
        assert op.proc.poll() is None  # it recovered by itself, not by being restarted
    finally:
        op.stop(signal.SIGTERM, timeout=OPERATOR_STOP_S)
        print(f"API server down {down:.1f} s; operator reconciling again {recovered:.1f} s after it was back")
        print(op.output()[-3000:])
    assert op.proc.returncode == 0, op.output()[-3000:]
