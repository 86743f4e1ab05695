"""Probes, preStop hooks and grace periods of every serving pod fit the drain (docs/reliability.md).

For each container that serves HTTP (the chart's gateway; the engine and the
sidecar of every pod the operator builds): readiness is ``/readyz`` (503
``draining`` from the first SIGTERM on), a preStop sleep lets endpoint
watchers drop the pod before SIGTERM, the drain timeout is set explicitly
(``MODELFLEET_SHUTDOWN_TIMEOUT_S``), and ``terminationGracePeriodSeconds``
exceeds preStop + drain timeout with room for the process to exit, so the
kubelet never SIGKILLs a stream that the drain would have finished.
"""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.dataplane.spec import InferenceDeploymentSpec
from modelfleet.operator.resources.children import Owner, PodPlacement, plan_children
from modelfleet.operator.settings import OperatorSettings
from tests.chart.test_chart import render

# what a drained process needs after its deadline: end the cut streams, run cleanup contexts, exit
EXIT_MARGIN_S = 10
# EndpointSlice watchers (kube-proxy, the sidecars' watch) see a terminating pod within a few seconds
MIN_PRESTOP_S = 3


def check_pod(pod: dict[str, Any], serving: set[str]) -> None:
    grace = pod["terminationGracePeriodSeconds"]
    by_name = {c["name"]: c for c in pod["containers"]}
    assert serving <= set(by_name), by_name.keys()
    for name in serving:
        c = by_name[name]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name  # draining is alive: no restart
        prestop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert "MODELFLEET_SHUTDOWN_TIMEOUT_S" in env, f"{name}: the drain timeout must be explicit, not a default"
        timeout = float(env["MODELFLEET_SHUTDOWN_TIMEOUT_S"])
        assert prestop >= MIN_PRESTOP_S, f"{name}: preStop {prestop} s is too short for endpoints to be removed"
        assert timeout > 0, name
        assert grace >= prestop + timeout + EXIT_MARGIN_S, (
            f"{name}: terminationGracePeriodSeconds {grace} < preStop {prestop} + drain {timeout} + {EXIT_MARGIN_S}"
        )
        # a readiness probe that only fails after the pod is gone would be useless; /readyz answers 503 at once
        assert c["readinessProbe"]["timeoutSeconds"] < prestop + timeout, name


@pytest.mark.parametrize("name", ["helm", "helm3"])
def test_chart_gateway_grace_covers_prestop_and_drain(name: str) -> None:
    docs = render(name=name)
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway")]
    check_pod(gateway["spec"]["template"]["spec"], {"gateway"})


@pytest.mark.parametrize(
    ("runtime", "placement"),
    [
        ({"kind": "torch", "device": "cpu"}, PodPlacement()),
        ({"kind": "vllm"}, PodPlacement(gpu_resource="nvidia.com/gpu", gpus_per_replica=1)),
    ],
)
def test_operator_pods_grace_covers_prestop_and_drain(runtime: dict[str, Any], placement: PodPlacement) -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {"model": {"name": "m", "source": {"path": "/m"}}, "runtime": runtime}
    )
    children = plan_children(Owner("chat", "llm", "uid"), spec, OperatorSettings(), placement)
    pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] == "Deployment"]
    assert pods
    for pod in pods:
        check_pod(pod, {"engine", "sidecar"})
