"""`modelfleet up`: the cluster's three roles as local processes on loopback.

For every deployment in the manifest it starts one engine per replica and one
coordinator sidecar per replica (as each pod has one in a cluster), each
sidecar knowing every engine of its deployment (and one engine per
``spec.spillover`` tier, serving that tier's hosted API, which the sidecars
spill to), then one gateway whose route for the deployment lists every sidecar. It reports load progress, prints the
URL when every child is ready, and on Ctrl-C or SIGTERM stops every child.
Children also get SIGTERM from the kernel if the launcher itself dies
(PR_SET_PDEATHSIG), so no process is orphaned.

Once the stack is up, a child that exits is reported (its name, pid and exit
status or signal) and, with ``restart="on-failure"`` (the default), started
again on the same port after a backoff of 1 s, 2 s, 4 s ... up to 30 s, as a
kubelet restarts a container; a child that ran for a minute starts its backoff
over. One that fails five times in a row within a minute of starting stops the
stack with exit status 1. With ``restart="never"`` the first exit stops the
stack. A child that fails during start-up always stops it: that is a broken
manifest or model, not a crash.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutesFile
from modelfleet.dataplane.manifest import load_manifests
from modelfleet.dataplane.rollout.local import LocalRollouts
from modelfleet.dataplane.runners.registry import MissingExtraError, require_runtime
from modelfleet.dataplane.spec import InferenceDeployment, Mode

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


def child_command(args: list[str]) -> list[str]:
    """The argv of one child role. ``-P``: the working directory is not put on sys.path, so a
    folder or file there named like a module (the repository's own ``operator/`` shadows the
    standard library's ``operator``) cannot replace what the child imports."""
    return [sys.executable, "-P", "-m", "modelfleet.dataplane.cli", *args]


def _popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)


@dataclass
class Child:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    failures_in_a_row: int = 0  # exits within STABLE_AFTER_S of starting, in a row

    def restart(self) -> None:
        self.proc = _popen(self.cmd, self.env)
        self.started = time.monotonic()
        self.restarts += 1


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Stack:
    """Children of one `modelfleet up`, in start order."""

    children: list[Child] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="modelfleet-up-")))

    def spawn(self, name: str, args: list[str], port: int, host: str, env: dict[str, str]) -> Child:
        cmd = child_command([*args, "--host", host, "--port", str(port)])
        child = Child(name, f"http://{host}:{port}", _popen(cmd, env), cmd, env)
        self.children.append(child)
        return child

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def of(self, deployment: str, role: str) -> list[Child]:
        """The deployment's children of one role (engine, sidecar), in start order."""
        return [c for c in self.children if c.name.startswith(f"{deployment}/{role}-")]

    # ---- what dataplane/rollout/local.py asks of the stack -------------------------------------------------
    def spawn_engines(self, dep: InferenceDeployment, manifest: Path, label: str) -> list[Child]:
        name, host = dep.metadata.name, "127.0.0.1"
        args = ["engine", "-f", str(manifest), "--deployment", name]
        engines = [
            self.spawn(f"{name}/{label}-{i}", [*args, "--replica", str(i)], free_port(host), host, self.env)
            for i in range(max(dep.spec.replicas, 1))
        ]
        for child in engines:
            print(f"  {child.name}: pid {child.proc.pid}, {child.url}", flush=True)
        return engines

    def stop_children(self, children: list[Child]) -> None:
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.proc.wait(20)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
            if child in self.children:
                self.children.remove(child)

    def repoint_sidecars(self, name: str, manifest: Path, engines: list[Child]) -> None:
        """Restart each sidecar of the deployment, one after the other, with ``engines`` as its replicas."""
        for sidecar in self.of(name, "sidecar"):
            cmd, kept = sidecar.cmd, []
            i = 0
            while i < len(cmd):
                if cmd[i] == "--peer":
                    i += 2
                    continue
                kept.append(str(manifest) if i > 0 and cmd[i - 1] == "-f" else cmd[i])
                i += 1
            sidecar.cmd = kept + [arg for e in engines for arg in ("--peer", e.url)]
            sidecar.proc.send_signal(signal.SIGTERM)
            try:
                sidecar.proc.wait(20)
            except subprocess.TimeoutExpired:
                sidecar.proc.kill()
                sidecar.proc.wait(5)
            sidecar.restart()
            deadline = time.monotonic() + 30
            while _get_json(sidecar.url + "/readyz", timeout=1.0)[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
        for i, engine in enumerate(engines):
            engine.name = f"{name}/engine-{i}"

    def ready(self, child: Child) -> bool:
        return _get_json(child.url + "/readyz", timeout=1.0)[0] == 200

    def sidecar_urls(self, name: str) -> list[str]:
        return [c.url for c in self.of(name, "sidecar")]

    def exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM everything (gateway first, engines last), then SIGKILL stragglers.

        By default stragglers get the children's drain timeout (MODELFLEET_SHUTDOWN_TIMEOUT_S) and 10 s
        more, so streams in flight finish, or end with an error event, before anything is killed.
        """
        if timeout is None:
            timeout = float(os.environ.get("MODELFLEET_SHUTDOWN_TIMEOUT_S", "30")) + 10.0
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


def start_stack(
    deployments: list[InferenceDeployment],
    manifest: Path,
    host: str,
    port: int,
    gateway_args: list[str] | None = None,
) -> tuple[Stack, Child]:
    """``gateway_args``: more flags of the gateway (its --api-keys and --admin-token)."""
    stack = Stack()
    env = stack.env
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
        # spill-over tiers: one engine each, serving the tier's hosted API with the remote runner
        tiers = [
            (
                tier.name,
                stack.spawn(
                    f"{name}/tier-{tier.name}",
                    ["engine", "-f", str(manifest), "--deployment", name, "--tier", tier.name],
                    free_port(host),
                    host,
                    env,
                ),
            )
            for tier in (dep.spec.spillover.tiers if dep.spec.spillover else [])
        ]
        # the sidecar reads its routing policy from the manifest, as the engine reads its spec
        sidecar_args = ["sidecar", "-f", str(manifest), "--deployment", name]
        sidecar_args += [arg for e in engines for arg in ("--peer", e.url)]
        sidecar_args += [arg for tier_name, e in tiers for arg in ("--tier", f"{tier_name}={e.url}")]
        sidecar_args += ["--rollout-file", str(stack.workdir / f"{name}.rollout.json")]  # dataplane/rollout/local.py
        local = [["--local-peer", engines[i].url] if i < len(engines) else [] for i in range(max(dep.spec.replicas, 1))]
        sidecars = [
            stack.spawn(f"{name}/sidecar-{i}", sidecar_args + local[i], free_port(host), host, env)
            for i in range(max(dep.spec.replicas, 1))
        ]
        routes.append(
            DeploymentRoute(
                name=name,
                models=dep.spec.served_names(),
                endpoints=[s.url for s in sidecars],
                created=created,
                runtime=dep.spec.runtime.kind,
            )
        )
    routes_file = stack.workdir / "routes.json"
    routes_file.write_text(RoutesFile(deployments=routes).model_dump_json(indent=2))
    gateway_cmd = ["gateway", "--routes", str(routes_file), *(gateway_args or [])]
    gateway = stack.spawn("gateway", gateway_cmd, port, host, env)
    return stack, gateway


def wait_until_ready(stack: Stack, out: TextIO, timeout: float) -> None:
    """Poll every child's /readyz until all answer 200 (sidecars: with every replica healthy),
    echoing each engine's load progress."""
    deadline = time.monotonic() + timeout
    shown: dict[str, str] = {}
    pending = list(stack.children)
    while pending:
        dead = stack.exited()
        if dead is not None:
            raise LaunchError(f"{dead.name} {describe_exit(dead.proc.returncode)} during start-up (see its log above)")
        if time.monotonic() > deadline:
            raise LaunchError(f"not ready after {timeout:.0f} s: {', '.join(c.name for c in pending)}")
        still = []
        for child in pending:
            status, body = _get_json(child.url + "/readyz")
            replicas = body.get("replicas")
            if status == 200 and isinstance(replicas, list) and not all(r.get("healthy") for r in replicas):
                status = 503  # a sidecar is ready with one replica; the stack, once it routes to all of them
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


RESTART_POLICIES = ("on-failure", "never")
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long before exiting starts its backoff over
MAX_FAILURES_IN_A_ROW = 5


def supervise(
    stack: Stack,
    out: TextIO,
    *,
    restart: str = "on-failure",
    poll_s: float = 0.5,
    backoff_s: float = 1.0,
    backoff_max_s: float = BACKOFF_MAX_S,
    stable_after_s: float = STABLE_AFTER_S,
    max_failures: int = MAX_FAILURES_IN_A_ROW,
    on_tick: Callable[[], None] | None = None,
) -> int:
    """Watch a ready stack until a child cannot be kept running; returns the exit status (1).
    ``on_tick`` runs once per poll (the local rollout controller)."""
    restart_at: dict[str, float] = {}
    recovering: set[str] = set()
    while True:
        if on_tick is not None:
            on_tick()
        now = time.monotonic()
        for child in stack.children:
            if child.name in restart_at:
                if now >= restart_at[child.name]:
                    del restart_at[child.name]
                    child.restart()
                    recovering.add(child.name)
                    print(
                        f"  {child.name}: restarted (pid {child.proc.pid}, restart {child.restarts})",
                        file=out,
                        flush=True,
                    )
                continue
            code = child.proc.poll()
            if code is None:
                if child.name in recovering and _get_json(child.url + "/readyz", timeout=1.0)[0] == 200:
                    recovering.discard(child.name)
                    print(f"  {child.name}: ready again", file=out, flush=True)
                continue
            recovering.discard(child.name)
            ran = now - child.started
            what = f"{child.name} (pid {child.proc.pid}) {describe_exit(code)} after {ran:.0f} s"
            if restart == "never":
                print(f"{what}; stopping", file=out, flush=True)
                return 1
            child.failures_in_a_row = child.failures_in_a_row + 1 if ran < stable_after_s else 1
            if child.failures_in_a_row > max_failures:
                print(
                    f"{what}; it failed {child.failures_in_a_row} times in a row within {stable_after_s:g} s "
                    "of starting; stopping",
                    file=out,
                    flush=True,
                )
                return 1
            delay = min(backoff_s * 2 ** (child.failures_in_a_row - 1), backoff_max_s)
            print(f"{what}; restarting it in {delay:.0f} s", file=out, flush=True)
            restart_at[child.name] = now + delay
        time.sleep(poll_s)


def try_command(url: str, dep: InferenceDeployment) -> str:
    """A curl line for the deployment's mode, printed once the stack is ready."""
    model = dep.spec.model
    path, body = {
        Mode.EMBEDDING: ("embeddings", f'{{"model": "{model.name}", "input": "Hello"}}'),
        Mode.RERANK: ("rerank", f'{{"model": "{model.name}", "query": "Hello", "documents": ["Hi", "Bye"]}}'),
    }.get(
        model.mode,
        ("chat/completions", f'{{"model": "{model.name}", "messages": [{{"role": "user", "content": "Hello"}}]}}'),
    )
    return f"curl {url}/v1/{path} -H 'content-type: application/json' -d '{body}'"


def gateway_auth(api_keys: Path | None, admin_token: Path | None) -> tuple[list[str], str]:
    """The gateway's auth flags and the line `up` prints about them; a bad file fails here, before any child starts."""
    from modelfleet.dataplane.gateway.auth import KeyFileError, load_admin_token, load_keys

    args: list[str] = []
    try:
        if admin_token is not None:
            load_admin_token(admin_token)
            args += ["--admin-token", str(admin_token.resolve())]
        if api_keys is None:
            metrics = "/metrics needs the admin token" if admin_token else "/metrics is open too"
            return args, (
                "  auth: OPEN: no API keys configured, anyone who reaches the gateway may use it "
                f"({metrics}; --api-keys FILE requires keys)"
            )
        keys = load_keys(api_keys)
    except KeyFileError as exc:
        raise LaunchError(str(exc)) from None
    metrics = "/metrics needs the admin token" if admin_token else "/metrics is closed (no --admin-token)"
    args += ["--api-keys", str(api_keys.resolve())]
    return args, f"  auth: API keys required: {len(keys)} key(s) from {api_keys}, reloaded when it changes; {metrics}"


def up(
    manifest: Path,
    host: str,
    port: int,
    out: TextIO = sys.stdout,
    ready_timeout: float = 600.0,
    restart: str = "on-failure",
    restart_backoff_s: float = 1.0,
    api_keys: Path | None = None,
    admin_token: Path | None = None,
) -> int:
    deployments = load_manifests(manifest)
    for dep in deployments:  # a missing extra is one clear line, before any process starts
        try:
            require_runtime(dep.spec)
        except MissingExtraError as exc:
            raise LaunchError(f"deployment {dep.metadata.name}: {exc}") from None
    check_port_free(host, port)
    gateway_args, auth_line = gateway_auth(api_keys, admin_token)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does

    signal.signal(signal.SIGTERM, on_signal)
    print(f"modelfleet up: {manifest} ({', '.join(d.metadata.name for d in deployments)})", file=out, flush=True)
    print(auth_line, file=out, flush=True)
    stack, gateway = start_stack(deployments, manifest, host, port, gateway_args)
    for child in stack.children:
        print(f"  {child.name}: pid {child.proc.pid}, {child.url}", file=out, flush=True)
    try:
        wait_until_ready(stack, out, ready_timeout)
        models = ", ".join(m for d in deployments for m in d.spec.served_names())
        print(f"\nReady: {gateway.url}/v1  (models: {models})", file=out)
        key_header = " -H 'authorization: Bearer <your API key>'" if api_keys else ""
        print(f"  try: {try_command(gateway.url, deployments[0])}{key_header}", file=out)
        print("Press Ctrl-C to stop.", file=out, flush=True)
        rollouts = LocalRollouts(manifest, stack.workdir, stack, out)
        rollouts.baseline = {d.metadata.name: d for d in deployments}
        rollouts.engines = {d.metadata.name: stack.of(d.metadata.name, "engine") for d in deployments}
        return supervise(stack, out, restart=restart, backoff_s=restart_backoff_s, on_tick=rollouts.tick)
    except KeyboardInterrupt:
        print("\nstopping...", file=out, flush=True)
        return 0
    except LaunchError as exc:
        print(f"error: {exc}", file=out, flush=True)
        return 1
    finally:
        stack.stop()
        print("stopped", file=out, flush=True)
