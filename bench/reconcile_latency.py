"""Reconcile latency: from `create InferenceDeployment` to its Deployment existing.

Target (issue #6): p99 <= 1 s for 200 CRs on the real API server. Starts the
test control plane (etcd, kube-apiserver, kube-controller-manager, kwok with
50 fake 8-GPU nodes), the CRDs
and one operator process, then creates 200 InferenceDeployments through the
API and watches Deployments: latency is the time from just before each create
call to the Deployment's ADDED event, measured in this process.

    .venv/bin/python bench/reconcile_latency.py [--count 200] [--rate 20] [--gpu-share 0.5]

--rate paces the creates (per second; 0 = all at once). --gpu-share makes that
fraction GPU deployments (vLLM, explicit size), which also read the inventory
and run placement on every reconcile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e.cluster import ControlPlane, fake_gpu_node  # noqa: E402
from e2e.operator_process import start_operator  # noqa: E402

CPU = {"model": {"name": "m", "source": {"path": "/m"}}, "runtime": {"kind": "torch", "device": "cpu"}, "replicas": 1}
GPU = {
    "model": {
        "name": "m",
        "source": {"path": "/m"},
        "size": {"parameters": 8_000_000_000, "numLayers": 32, "numKvHeads": 8, "headDim": 128},
    },
    "runtime": {"kind": "vllm"},
    "replicas": 1,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--gpu-share", type=float, default=0.5)
    args = parser.parse_args()

    with ControlPlane(controller_manager=True, kwok=True) as cp:
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        from kubernetes import client, config, watch

        config.load_kube_config(str(cp.kubeconfig))
        for crd in ("inferencedeployments.modelfleet.io.yaml", "kopf-peerings.yaml"):
            cp.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / crd))
        cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        cp.apply(*[fake_gpu_node(f"gpu-{i}", gpu_count=8) for i in range(50)])
        # the node lifecycle controller lifts the not-ready taint once kwok reports Ready
        cp.wait_for(
            "GPU nodes schedulable",
            lambda: all(not n["spec"].get("taints") for n in cp.get_json("nodes")["items"]),
            120,
        )
        cp.kubectl("create", "namespace", "bench")
        log = Path(tempfile.mkdtemp(prefix="bench-op-")) / "operator.log"
        op = start_operator(cp, log)
        op.wait_for_log("Initial authentication has finished", 60)
        time.sleep(2)

        created: dict[str, float] = {}
        seen: dict[str, float] = {}
        done = threading.Event()

        def watcher() -> None:
            apps = client.AppsV1Api()
            for event in watch.Watch().stream(apps.list_namespaced_deployment, "bench", timeout_seconds=600):
                name = event["object"].metadata.name
                if event["type"] == "ADDED" and name not in seen:
                    seen[name] = time.perf_counter()
                    if len(seen) >= args.count:
                        done.set()
                        return

        threading.Thread(target=watcher, daemon=True).start()
        time.sleep(1)
        api = client.CustomObjectsApi()
        gpu_every = int(1 / args.gpu_share) if args.gpu_share else 0
        start = time.perf_counter()
        for i in range(args.count):
            name = f"d{i:04d}"
            spec = GPU if gpu_every and i % gpu_every == 0 else CPU
            body = {
                "apiVersion": "modelfleet.io/v1alpha1",
                "kind": "InferenceDeployment",
                "metadata": {"name": name},
                "spec": spec,
            }
            created[name] = time.perf_counter()
            api.create_namespaced_custom_object("modelfleet.io", "v1alpha1", "bench", "inferencedeployments", body)
            if args.rate:
                time.sleep(max(0.0, start + (i + 1) / args.rate - time.perf_counter()))
        finished = done.wait(300)
        op.stop()
        if not finished:
            print(f"only {len(seen)} of {args.count} Deployments appeared; operator log tail:\n{op.output()[-3000:]}")
            sys.exit(1)
        lat = [seen[n] - created[n] for n in created]
        gpu_lat = [seen[n] - created[n] for i, n in enumerate(sorted(created)) if gpu_every and i % gpu_every == 0]
        print(
            f"\nmachine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}, kube-apiserver {cp.version}"
        )
        print(
            f"{'CRs':>5} {'rate/s':>7} {'gpu share':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'gpu p99 ms':>10}"
        )
        print(
            f"{args.count:>5} {args.rate or 'burst':>7} {args.gpu_share:>9} {statistics.median(lat) * 1000:>8.0f} "
            f"{percentile(lat, 0.9) * 1000:>8.0f} {percentile(lat, 0.99) * 1000:>8.0f} {max(lat) * 1000:>8.0f} "
            f"{(percentile(gpu_lat, 0.99) * 1000 if gpu_lat else 0):>10.0f}"
        )
        print(json.dumps({"p50_s": statistics.median(lat), "p99_s": percentile(lat, 0.99)}))


if __name__ == "__main__":
    main()
