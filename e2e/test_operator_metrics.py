"""The operator gathers its pods' engine metrics into status.metrics.

The pods on kwok nodes run no processes and their addresses are fake, so the
operator is pointed (MODELFLEET_OPERATOR_METRICS_URL_TEMPLATE) at a real HTTP
server on loopback that serves a real engine metrics registry per pod, whose
counters grow between scrapes as a busy engine's would.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from e2e.operator_process import start_operator
from modelfleet.dataplane.engine.metrics import EngineMetrics

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]


class Engines:
    """One EngineMetrics per pod; every scrape first records 5 requests and 100 tokens."""

    def __init__(self) -> None:
        self.by_pod: dict[str, EngineMetrics] = {}
        self.lock = threading.Lock()

    def scrape(self, pod: str) -> bytes:
        with self.lock:
            m = self.by_pod.setdefault(pod, EngineMetrics())
            m.requests.labels(outcome="ok").inc(5)
            m.requests.labels(outcome="cancelled").inc(1)
            m.generation_tokens.inc(100)
            for _ in range(5):
                m.ttft_seconds.observe(0.2)
            return generate_latest(m.registry)


def test_status_metrics_come_from_the_pods(crd, gpu_nodes, namespace, tmp_path):
    crd.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peerings.yaml"))
    engines = Engines()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = engines.scrape(self.path.rsplit("/", 1)[-1])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    op = start_operator(
        crd,
        tmp_path / "operator.log",
        env={
            "MODELFLEET_OPERATOR_METRICS_INTERVAL_S": "1",
            "MODELFLEET_OPERATOR_METRICS_URL_TEMPLATE": f"http://127.0.0.1:{port}/metrics/{{pod_name}}",
        },
    )
    try:
        doc = {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceDeployment",
            "metadata": {"name": "busy"},
            "spec": {
                "model": {"name": "m", "source": {"path": "/m"}},
                "runtime": {"kind": "torch", "device": "cpu"},
                "replicas": 2,
            },
        }
        crd.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

        def metrics() -> dict | None:
            status = crd.get_json("infd", "busy", "-n", namespace).get("status", {})
            snap = status.get("metrics") or {}
            # other tests' deployments may still be finishing in this cluster: count this one's pods only
            busy_pods = [p for p in engines.by_pod if p.startswith("busy-")]
            return snap if snap.get("tokensPerSecond", 0) > 0 and len(busy_pods) == 2 else None

        snap = crd.wait_for("status.metrics from both pods", metrics, 90)
        # two pods, each +100 tokens and +6 requests per ~1 s scrape interval
        assert 50 < snap["tokensPerSecond"] < 1000
        assert snap["requestsPerSecond"] > 0
        assert snap["errorsByKind"].get("cancelled", 0) >= 1
        assert snap["ttftP95Seconds"] == pytest.approx(0.2, abs=0.06)
        assert snap["collectedAt"]
    finally:
        crd.kubectl("delete", "infd/busy", "-n", namespace, "--timeout=60s", check=False)
        op.stop()
        server.shutdown()
        server.server_close()
        print(op.output()[-3000:])
