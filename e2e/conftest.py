"""Shared fixtures for tests against a real kube-apiserver.

One control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok) serves the whole session; each test works in a
namespace of its own. Missing binaries fail loudly with the command that
installs them (`make k8s`); nothing is skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import ControlPlane

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "inferencedeployments.modelfleet.io.yaml"


@pytest.fixture(scope="session")
def k8s() -> Iterator[ControlPlane]:
    cp = ControlPlane(controller_manager=True, scheduler=True, kwok=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def crd(k8s: ControlPlane) -> ControlPlane:
    """The InferenceDeployment CRD installed and Established."""
    k8s.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    k8s.kubectl("wait", "--for=condition=Established", "crd/inferencedeployments.modelfleet.io", "--timeout=60s")
    return k8s


@pytest.fixture
def namespace(k8s: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s.kubectl("create", "namespace", name)
    failed_before = request.session.testsfailed
    yield name
    if request.session.testsfailed > failed_before:
        dump = k8s.kubectl("get", "infd,deploy,svc,cm,pdb,pods,events", "-n", name, "-o", "wide", check=False)
        print(f"--- objects in {name} ---\n{dump.stdout}{dump.stderr}")
        k8s.dump_logs(tail_lines=40)
    k8s.kubectl("delete", "namespace", name, "--wait=false", check=False)
