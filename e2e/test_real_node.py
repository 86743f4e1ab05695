"""A real kubelet node (containerd + runc + CNI bridge) joins the test control plane and runs a pod.

Select with ``-m real_node`` (or this file's path); needs root, ``scripts/k8s-install.sh`` and
``scripts/node-install.sh``. Its own control plane, not the session's: the kubelet's static
token must be in the API server's token file when the API server starts.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.cluster import ControlPlane
from e2e.node import NODE_TOLERATION, RealNode, cgroup_version, node_control_plane

pytestmark = [pytest.mark.k8s, pytest.mark.slow, pytest.mark.real_node]

NODE = "mf-node-0"


@pytest.fixture(scope="module")
def real_node() -> Iterator[RealNode]:
    t0 = time.monotonic()
    cp = node_control_plane(NODE)
    cp.start()
    try:
        node = RealNode(cp, NODE)
        node.start()
        print(f"\ncontrol plane + real node Ready in {time.monotonic() - t0:.1f}s (cgroup v{cgroup_version()})")
        try:
            yield node
        finally:
            node.stop()
    finally:
        cp.stop()


def _pod(name: str, image: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [NODE_TOLERATION],
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "main", "image": image, "imagePullPolicy": "Never", "command": command, **container}
            ],
        },
    }


def _wait_running(node: RealNode, ns: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        pod: dict[str, Any] = node.cp.get_json("pod", name, "-n", ns)
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        return pod if pod["status"].get("phase") == "Running" and ready else None

    try:
        result: dict[str, Any] = node.cp.wait_for(f"pod {ns}/{name} Running and Ready", running, timeout)
        return result
    except TimeoutError:
        print(node.cp.kubectl("describe", "pod", name, "-n", ns, check=False).stdout)
        node.dump_logs()
        raise


def _namespace(cp: ControlPlane) -> str:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cp.kubectl("create", "namespace", ns)
    cp.wait_for(
        "the namespace's default ServiceAccount",
        lambda: cp.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
        30,
    )
    return ns


def test_node_is_ready_and_isolated(real_node: RealNode) -> None:
    node = real_node.node_object()
    conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conds["Ready"] == "True", conds
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == real_node.cp.version
    assert info["containerRuntimeVersion"].startswith("containerd://"), info
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_node.node_ip
    assert node["spec"]["taints"][0]["key"] == NODE_TOLERATION["key"]
    # no route to anything outside the node's netns (checked without sending a packet)
    assert "unreachable" in real_node.outside_route_check("1.1.1.1").lower()


def test_trivial_pod_runs_logs_and_exec(real_node: RealNode) -> None:
    cp = real_node.cp
    ns = _namespace(cp)
    busybox = real_node.images["busybox"]
    t0 = time.monotonic()
    cp.apply(
        {
            **_pod(
                "hello",
                busybox.ref,
                ["sh", "-c", "echo hello-from-a-real-pod; exec sleep 3600"],
                securityContext={"readOnlyRootFilesystem": True},
            ),
            "metadata": {"name": "hello", "namespace": ns},
        }
    )
    pod = _wait_running(real_node, ns, "hello")
    print(f"pod Running and Ready {time.monotonic() - t0:.1f}s after apply")
    # a real pod: its IP comes from the node's CNI bridge, its image is the one built here
    assert ipaddress.ip_address(pod["status"]["podIP"]) in real_node.pod_cidr, pod["status"]
    (status,) = pod["status"]["containerStatuses"]
    assert status["imageID"] == busybox.image_id, (status["imageID"], busybox)

    logs = cp.kubectl("logs", "hello", "-n", ns).stdout
    assert "hello-from-a-real-pod" in logs

    out = cp.kubectl("exec", "hello", "-n", ns, "--", "sh", "-c", "hostname; cat /proc/1/cmdline | tr '\\0' ' '")
    hostname, cmdline = out.stdout.splitlines()[:2]
    assert hostname == "hello"
    assert cmdline.split() == ["sleep", "3600"]  # PID 1 of the pod's container: the shell exec'd sleep
    ro = cp.kubectl("exec", "hello", "-n", ns, "--", "touch", "/written", check=False)
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr + ro.stdout, ro
    cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_pod_reaches_the_api_server_through_the_kubernetes_service(real_node: RealNode) -> None:
    """kube-proxy (iptables, in the node's netns) sends the ClusterIP to the harness's forwarder."""
    cp = real_node.cp
    real_node.publish_apiserver_endpoint()
    ns = _namespace(cp)
    pod = _pod("client", real_node.images["busybox"].ref, ["sleep", "3600"])
    pod["metadata"]["namespace"] = ns
    cp.apply(pod)
    _wait_running(real_node, ns, "client")
    # plain HTTP to the TLS port: only Go's TLS server (the API server) answers like this
    probe = 'printf "GET /version HTTP/1.0\\r\\n\\r\\n" | nc -w 5 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT"'

    def answered() -> str | None:
        out = cp.kubectl("exec", "client", "-n", ns, "--", "sh", "-c", probe, check=False).stdout
        return out if "Client sent an HTTP request to an HTTPS server" in out else None

    cp.wait_for("the API server's answer through the kubernetes Service", answered, 30)
    cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
