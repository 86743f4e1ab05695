"""Sidecar peer discovery against a real kube-apiserver: the real `modelfleet sidecar --kubernetes`
process follows the EndpointSlices of a headless Service, with nothing but the RBAC the operator
gives its pods.

There is no container runtime here (kwok pods run no containers, and their IPs answer nothing), so
the engines are stand-ins: tiny HTTP servers that answer /readyz, /load and /v1/chat/completions
with their own name, on this machine's own non-loopback address (the API server refuses loopback
addresses in an EndpointSlice). The EndpointSlices are written by hand with that address and the
servers' ports, as the EndpointSlice controller writes them for real pods (one slice per port
set). The sidecar runs on this machine with a token of the ServiceAccount that
``children.sidecar_access`` renders, bound to its Role.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.cluster import ControlPlane, free_port
from modelfleet.operator.resources.children import Owner, services, sidecar_access

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "chat-peers"


def host_address() -> str:
    """This machine's IPv4 address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))
        except OSError:
            pytest.skip("this machine has no non-loopback IPv4 address for the stand-in engines")
        address = str(s.getsockname()[0])
    if address.startswith("127.") or address.startswith("169.254."):
        pytest.skip(f"this machine's address {address} cannot be an EndpointSlice address")
    return address


class StandIns:
    """Stand-in engines, one ThreadingHTTPServer each; ``served`` counts chat requests by name."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.servers: dict[str, ThreadingHTTPServer] = {}
        self.served: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start(self, name: str) -> int:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/load":
                    self._json({"running": 0, "queued": 0})
                else:
                    self._json({"status": "ready"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with owner._lock:
                    owner.served[name] += 1
                self._json({"object": "chat.completion", "served_by": name})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.address, 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers[name] = server
        return int(server.server_address[1])

    def stop(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


@pytest.fixture
def stand_ins() -> Iterator[StandIns]:
    s = StandIns(host_address())
    yield s
    s.stop()


def endpoint_slice(namespace: str, address: str, name: str, port: int, **conditions: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": SERVICE, "endpointslice.kubernetes.io/managed-by": "e2e-test"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True, **conditions}}],
        "ports": [{"name": "engine", "port": port, "protocol": "TCP"}],
    }


def unowned(obj: dict[str, Any]) -> dict[str, Any]:
    """As the operator renders it, minus the owner reference (no InferenceDeployment here to own it)."""
    obj = json.loads(json.dumps(obj))
    obj["metadata"].pop("ownerReferences")
    return obj


def can_i(k8s: ControlPlane, ns: str, *args: str) -> bool:
    res = k8s.kubectl("auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:chat-sidecar", check=False)
    return res.stdout.strip() == "yes"


def test_sidecar_peers_follow_the_endpoint_slices(k8s, namespace, stand_ins, tmp_path):
    owner = Owner("chat", namespace, "not-applied")
    k8s.apply(*(unowned(o) for o in [*sidecar_access(owner), services(owner)[0]]))
    k8s.wait_for(
        "the sidecar's ServiceAccount", lambda: can_i(k8s, namespace, "list", "endpointslices", "-n", namespace)
    )
    assert can_i(k8s, namespace, "watch", "endpointslices.discovery.k8s.io", "-n", namespace)
    for denied in [
        ("list", "endpointslices", "-n", "default"),  # its own namespace only
        ("list", "pods", "-n", namespace),
        ("get", "secrets", "-n", namespace),
        ("list", "endpoints", "-n", namespace),
        ("create", "endpointslices", "-n", namespace),
    ]:
        assert not can_i(k8s, namespace, *denied), denied
    kubeconfig = k8s.write_kubeconfig_for_token(
        tmp_path / "sidecar.kubeconfig",
        k8s.create_token("chat-sidecar", namespace),
        user=f"system:serviceaccount:{namespace}:chat-sidecar",
    )
    ports = {name: stand_ins.start(name) for name in ("a", "b", "not-ready", "terminating")}

    port = free_port()
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.dataplane.cli", "sidecar", "--deployment", "chat",
             "--kubernetes", "--service", SERVICE, "--namespace", namespace, "--discovery-interval", "0.3",
             "--policy", "RoundRobin", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1",
                 # an open watch outlives a revoked RoleBinding (the API server authorizes it once): renew
                 # it every 2 s so the refusal below is met within the test's wait
                 "MODELFLEET_DISCOVERY_WATCH_TIMEOUT_S": "2"},
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def healthy_peers() -> set[str] | None:
        """The ports of the replicas the sidecar routes to now."""
        try:
            replicas = httpx.get(f"{base}/readyz", timeout=2).json()["replicas"]
        except (httpx.HTTPError, ValueError):
            return None
        return {r["url"].rsplit(":", 1)[1] for r in replicas if r["healthy"]}

    def expect_peers(names: set[str], what: str) -> None:
        want = {str(ports[n]) for n in names}
        k8s.wait_for(what, lambda: healthy_peers() == want, 30, interval=0.2)

    def send(n: int) -> Counter[str]:
        before = Counter(stand_ins.served)
        for i in range(n):
            r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": str(i)}]})
            assert r.status_code == 200, r.text
        return Counter(stand_ins.served) - before

    try:
        k8s.wait_for("the sidecar listening", lambda: healthy_peers() is not None, 30, interval=0.2)
        assert healthy_peers() == set()  # no --peer and no slice yet: nothing to route to
        assert httpx.get(f"{base}/readyz").status_code == 503

        k8s.apply(endpoint_slice(namespace, stand_ins.address, "chat-peers-a", ports["a"]))
        expect_peers({"a"}, "engine a discovered")
        assert send(4) == Counter({"a": 4})

        k8s.apply(
            endpoint_slice(namespace, stand_ins.address, "chat-peers-b", ports["b"]),
            endpoint_slice(namespace, stand_ins.address, "chat-peers-c", ports["not-ready"], ready=False),
            endpoint_slice(namespace, stand_ins.address, "chat-peers-d", ports["terminating"], terminating=True),
        )
        expect_peers({"a", "b"}, "engine b added; the not-ready and terminating endpoints left out")
        assert send(8) == Counter({"a": 4, "b": 4})

        k8s.kubectl(
            "patch", "endpointslice", "chat-peers-b", "-n", namespace, "--type=json",
            "-p", '[{"op": "replace", "path": "/endpoints/0/conditions/ready", "value": false}]',
        )  # fmt: skip
        expect_peers({"a"}, "engine b marked not ready")
        assert send(6) == Counter({"a": 6})

        # the API refuses the sidecar (its RoleBinding is gone): it keeps the peers it knows
        k8s.kubectl("delete", "rolebinding", "chat-sidecar", "-n", namespace)
        k8s.wait_for("the sidecar's list refused", lambda: "403" in log.read_text(errors="replace"), 30)
        k8s.apply(endpoint_slice(namespace, stand_ins.address, "chat-peers-b", ports["b"]))  # unseen now
        assert healthy_peers() == {str(ports["a"])}
        assert send(3) == Counter({"a": 3})
        assert "keeping the 1 known peers" in log.read_text(errors="replace")

        k8s.apply(unowned(sidecar_access(owner)[2]))  # allowed again: it catches up
        expect_peers({"a", "b"}, "engine b back after the RoleBinding is restored")
        assert sidecar.poll() is None
    except BaseException:
        print(k8s.kubectl("get", "endpointslices", "-n", namespace, "-o", "yaml", check=False).stdout)
        print(f"--- sidecar log ---\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(15)
        except subprocess.TimeoutExpired:
            sidecar.kill()
            sidecar.wait(5)
