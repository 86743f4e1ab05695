"""`modelfleet up`: the cluster's three roles as local processes on loopback.

For every deployment in the manifest it starts one engine per replica and one
coordinator sidecar per replica (as each pod has one in a cluster), then one
gateway for all of them. It reports load progress, prints the URL when every
deployment has a ready replica, and on Ctrl-C or SIGTERM stops every child.
Children also get SIGTERM from the kernel if the launcher itself dies
(PR_SET_PDEATHSIG), so no process is orphaned.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutesFile
from modelfleet.dataplane.manifest import load_manifests
from modelfleet.dataplane.spec import InferenceDeployment

PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """The local stack could not start; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise LaunchError(f"{host}:{port} is already in use; pick another with --port") from None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launcher dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgid(0, 0)  # own process group: a terminal's Ctrl-C reaches only the launcher


@dataclass
class Child:
    name: str
    url: str
    proc: subprocess.Popen[bytes]


@dataclass
class Stack:
    """Children of one `modelfleet up`, in start order."""

    children: list[Child] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="modelfleet-up-")))

    def spawn(self, name: str, args: list[str], port: int, host: str, env: dict[str, str]) -> Child:
        cmd = [sys.executable, "-m", "modelfleet.dataplane.cli", *args, "--host", host, "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        child = Child(name, f"http://{host}:{port}", proc)
        self.children.append(child)
        return child

    def exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM everything (gateway first, engines last), then SIGKILL stragglers."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}
    except (OSError, ValueError):
        return 0, {}


def start_stack(deployments: list[InferenceDeployment], manifest: Path, host: str, port: int) -> tuple[Stack, Child]:
    stack = Stack()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    routes: list[DeploymentRoute] = []
    created = int(time.time())
    for dep in deployments:
        name = dep.metadata.name
        engines = [
            stack.spawn(
                f"{name}/engine-{i}",
                ["engine", "-f", str(manifest), "--deployment", name, "--replica", str(i)],
                free_port(host),
                host,
                env,
            )
            for i in range(dep.spec.replicas)
        ]
        peers = [arg for e in engines for arg in ("--peer", e.url)]
        sidecars = [
            stack.spawn(f"{name}/sidecar-{i}", ["sidecar", "--deployment", name, *peers], free_port(host), host, env)
            for i in range(max(dep.spec.replicas, 1))
        ]
        routes.append(
            DeploymentRoute(
                name=name, models=dep.spec.served_names(), endpoints=[s.url for s in sidecars], created=created
            )
        )
    routes_file = stack.workdir / "routes.json"
    routes_file.write_text(RoutesFile(deployments=routes).model_dump_json(indent=2))
    gateway = stack.spawn("gateway", ["gateway", "--routes", str(routes_file)], port, host, env)
    return stack, gateway


def wait_until_ready(stack: Stack, out: TextIO, timeout: float) -> None:
    """Poll every child's /readyz until all answer 200, echoing each engine's load progress."""
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    pending = list(stack.children)
    while pending:
        dead = stack.exited()
        if dead is not None:
            raise LaunchError(
                f"{dead.name} exited with code {dead.proc.returncode} during start-up (see its log above)"
            )
        if time.monotonic() > deadline:
            raise LaunchError(f"not ready after {timeout:.0f} s: {', '.join(c.name for c in pending)}")
        still = []
        for child in pending:
            status, body = _get_json(child.url + "/readyz")
            if body.get("status") == "failed":
                raise LaunchError(f"{child.name} failed: {body.get('progress')}")
            if status == 200:
                progress = "ready"
            elif status and "engine" in child.name:
                progress = str(body.get("progress") or body.get("status") or "starting")
            else:
                progress = ""
            if progress and shown.get(child.name) != progress:
                print(f"  {child.name}: {progress}", file=out, flush=True)
                shown[child.name] = progress
            if status != 200:
                still.append(child)
        pending = still
        if pending:
            time.sleep(0.3)


def up(manifest: Path, host: str, port: int, out: TextIO = sys.stdout, ready_timeout: float = 600.0) -> int:
    deployments = load_manifests(manifest)
    check_port_free(host, port)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does

    signal.signal(signal.SIGTERM, on_signal)
    print(f"modelfleet up: {manifest} ({', '.join(d.metadata.name for d in deployments)})", file=out, flush=True)
    stack, gateway = start_stack(deployments, manifest, host, port)
    try:
        wait_until_ready(stack, out, ready_timeout)
        models = ", ".join(m for d in deployments for m in d.spec.served_names())
        print(f"\nReady: {gateway.url}/v1  (models: {models})", file=out)
        print(
            f"  try: curl {gateway.url}/v1/chat/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{deployments[0].spec.model.name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
            file=out,
        )
        print("Press Ctrl-C to stop.", file=out, flush=True)
        while True:
            dead = stack.exited()
            if dead is not None:
                print(f"{dead.name} exited with code {dead.proc.returncode}; stopping", file=out, flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", file=out, flush=True)
        return 0
    except LaunchError as exc:
        print(f"error: {exc}", file=out, flush=True)
        return 1
    finally:
        stack.stop()
        print("stopped", file=out, flush=True)
