"""The Helm chart with ModelFleet's own images, built here, on a real kubelet node.

Select with ``-m real_node``; needs root and ``scripts/k8s-install.sh``, ``scripts/node-install.sh``
and ``scripts/images.sh`` (builds docker/Dockerfile with buildah on an mmdebstrap base). The
first step of issue 18's acceptance: operator and gateway pods Running and Ready from images no
registry served, a user reaching the gateway the way the chart's NOTES tell them to.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import ControlPlane
from e2e.node import NODE_TOLERATION, RealNode, modelfleet_images, node_control_plane

pytestmark = [pytest.mark.k8s, pytest.mark.slow, pytest.mark.real_node]

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "modelfleet"
NODE = "mf-node-0"
NS = "modelfleet"
RELEASE = "mf"


@pytest.fixture(scope="module")
def chart_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    image = modelfleet_images()["modelfleet"]  # fails loudly, with the command, when not built
    cp = node_control_plane(NODE)
    cp.start()
    try:
        t0 = time.monotonic()
        node = RealNode(cp, NODE, extra_images=[image.archive])
        node.start()
        print(f"\nreal node Ready in {time.monotonic() - t0:.1f}s; image imports: {node.import_s}")
        node.publish_apiserver_endpoint()
        on_node = {"tolerations": [NODE_TOLERATION], "nodeSelector": {"kubernetes.io/hostname": NODE}}
        tag = image.ref.rsplit(":", 1)[1]
        values = {
            "image": {"registry": image.ref.rsplit("/", 1)[0], "tag": tag},
            "operator": on_node,
            "gateway": on_node,
        }
        values_file = tmp_path_factory.mktemp("chart") / "values.json"
        values_file.write_text(json.dumps(values))
        t0 = time.monotonic()
        res = subprocess.run(
            [
                cp.bin("helm"),
                f"--kubeconfig={cp.kubeconfig}",
                "install",
                RELEASE,
                str(CHART),
                "-n",
                NS,
                "--create-namespace",
                "-f",
                str(values_file),
                "--wait",
                "--timeout",
                "180s",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        if res.returncode != 0:
            print(cp.kubectl("describe", "pods", "-n", NS, check=False).stdout)
            node.dump_logs()
            raise AssertionError(f"helm install failed: {res.stderr}")
        print(f"helm install --wait: {time.monotonic() - t0:.1f}s")
        try:
            yield node
        finally:
            node.stop()
    finally:
        cp.stop()


def _pods(cp: ControlPlane, component: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cp.get_json("pods", "-n", NS, "-l", f"app.kubernetes.io/component={component}")[
        "items"
    ]
    return items


@pytest.mark.parametrize("component", ["operator", "gateway"])
def test_chart_pods_run_the_images_built_here(chart_node: RealNode, component: str) -> None:
    image = modelfleet_images()["modelfleet"]
    (pod,) = _pods(chart_node.cp, component)
    assert pod["spec"]["nodeName"] == NODE
    assert pod["status"]["phase"] == "Running"
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status
    assert status["imageID"] == image.image_id, (status["imageID"], image)
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    ro = chart_node.cp.kubectl(
        "exec", "-n", NS, pod["metadata"]["name"], "--", "python3", "-c", "open('/written', 'w')", check=False
    )
    assert "Read-only file system" in ro.stderr, ro


def test_gateway_answers_the_openai_client_through_its_service(chart_node: RealNode) -> None:
    """From the node's netns, as an in-cluster client: the ClusterIP of the gateway Service."""
    from openai import OpenAI

    svc = chart_node.cp.get_json("svc", f"{RELEASE}-gateway", "-n", NS)
    base = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}/v1"

    def list_models() -> list[str]:
        with OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=10) as client:
            return [m.id for m in client.models.list()]

    assert chart_node.in_netns(list_models) == []  # no InferenceDeployment yet


def test_gateway_through_kubectl_port_forward(chart_node: RealNode) -> None:
    """What the chart's NOTES tell a user: `kubectl port-forward svc/<release>-gateway`."""
    cp = chart_node.cp
    pf = subprocess.Popen(
        [
            cp.bin("kubectl"),
            f"--kubeconfig={cp.kubeconfig}",
            "port-forward",
            "-n",
            NS,
            f"svc/{RELEASE}-gateway",
            "--address=127.0.0.1",
            ":80",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert pf.stdout is not None
        line = pf.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, line
        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        pf.terminate()
        pf.wait(timeout=10)
        if pf.stdout is not None:
            pf.stdout.close()


def test_operator_in_the_pod_reconciles_an_inference_deployment(chart_node: RealNode) -> None:
    """The operator reaches the API server in-cluster (ServiceAccount token, kubernetes Service)."""
    cp = chart_node.cp
    cp.kubectl("apply", "-n", "default", "-f", str(ROOT / "examples" / "smollm2-local.yaml"))
    dep = cp.wait_for(
        "the operator's engine Deployment for smollm2",
        lambda: cp.kubectl("get", "deployment", "smollm2", "-n", "default", "-o", "json", check=False).stdout,
        90,
    )
    containers = [c["name"] for c in json.loads(dep)["spec"]["template"]["spec"]["containers"]]
    assert containers == ["engine", "sidecar"]
    cp.kubectl("delete", "-n", "default", "-f", str(ROOT / "examples" / "smollm2-local.yaml"), check=False)
