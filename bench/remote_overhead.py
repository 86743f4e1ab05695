"""Remote runner overhead: what the remote runner and the stack add over calling the provider directly (issue #4).

A deployment with ``runtime.kind: remote`` forwards each OpenAI request to a
hosted OpenAI-compatible API. This measures what that costs on top of calling
the API directly. The "provider" is ``bench/fake_upstream.py`` on loopback
(answers every streaming chat completion at once with ``--chunks`` SSE
chunks, the usage event and ``[DONE]``), so what is measured is ModelFleet,
not a model or a network. Three contenders, one after the other, in the same
invocation, against the same upstream process, measured by the same load
generator (``bench/router_overhead.py``'s: one keep-alive HTTP/1.1 connection
per concurrent stream, each stream sending its next request as soon as the
last one ended):

- ``direct``: the load generator streams straight from the fake upstream; the
  baseline that "added" latency is measured against.
- ``engine``: one engine process, ``modelfleet engine -f manifest --port P``,
  whose manifest has ``runtime.kind: remote`` with ``baseUrl`` the fake
  upstream: the remote runner's own overhead (engine HTTP server, scheduler,
  runner, aiohttp client to the upstream, SSE re-encoding).
- ``full stack``: ``modelfleet up -f manifest`` (gateway -> sidecar ->
  engine(remote) -> upstream): what a user pays end to end.

For each concurrency level: ``--warmup`` seconds unmeasured, then every request
that ends within ``--duration`` seconds counts: requests/s, time to the first
body byte (TTFB) p50/p99, end-to-end latency (send to last byte) p50/p99, and
added = contender minus direct at the same level. The engine sends its first
SSE event (the assistant role) only once the upstream's first token has
arrived, so TTFB is also time to first token here. CPU time per request of the
contender's processes comes from /proc over the measured window (the steadier
figure when other work shares the cores).

    .venv/bin/python bench/remote_overhead.py [--levels 1 32] [--duration 10] [--warmup 2]

Nothing is pinned: on a small machine the generator, the contender and the
upstream share the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.router_overhead import (  # noqa: E402
    MODEL,
    PROFILED,
    Proc,
    Running,
    _cpu_per_req,
    _version,
    cpu_model,
    free_port,
    measure,
    proc_cpu_s,
    start_run,
    wait_streaming,
)

DIRECT, ENGINE, FULL = "direct", "engine", "full stack"
CONTENDERS = (DIRECT, ENGINE, FULL)
DEPLOYMENT = "bench"


def manifest(upstream: str, max_num_seqs: int | None) -> str:
    engine = f"\n  engine: {{maxNumSeqs: {max_num_seqs}}}" if max_num_seqs else ""
    return f"""apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata: {{name: {DEPLOYMENT}}}
spec:
  model: {{name: {MODEL}, source: {{runtimeManaged: true}}}}
  runtime:
    kind: remote
    remote: {{baseUrl: "{upstream}/v1", model: {MODEL}}}{engine}
"""


@dataclass
class Descendant:
    """A process ``modelfleet up`` started: named by its role, CPU time read from /proc like ``Proc``."""

    name: str
    pid: int

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    for word in (b"gateway", b"sidecar", b"engine"):
        if word in argv:
            return word.decode()
    return f"pid {pid}"


def stack_processes(launcher: Proc) -> list[Descendant]:
    kids = [Descendant(role(pid), pid) for pid in children(launcher.popen.pid)]
    return [Descendant("launcher", launcher.popen.pid), *sorted(kids, key=lambda d: d.name)]


def stop_stack(run: Running, launcher: Proc, kids: list[Descendant]) -> None:
    """SIGTERM the launcher (it stops its children); SIGKILL any child of it still there after."""
    run.stop([launcher])
    deadline = time.monotonic() + 10
    for d in kids:
        if d.name == "launcher":
            continue
        while Path(f"/proc/{d.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            if role(d.pid) == d.name:  # still ours, not a recycled pid
                os.kill(d.pid, signal.SIGKILL)


def start_contender(
    run: Running, name: str, upstream: str, manifest_path: Path, profile: Path | None = None
) -> tuple[str, list[Proc | Descendant], Proc | None]:
    """Start one contender; returns (URL the load generator uses, processes to read CPU from, the launcher if any)."""
    if name == DIRECT:
        return upstream, [], None
    py = [sys.executable, "-m", "modelfleet.dataplane.cli"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if name == ENGINE:
        if profile is not None:  # router_overhead's cProfile wrapper, which writes its file on SIGTERM
            py = [sys.executable, str(ROOT / "bench" / "router_overhead.py"), PROFILED, str(profile / "engine.prof")]
        engine = run.spawn(
            "engine",
            [*py, "engine", "-f", str(manifest_path), "--host", "127.0.0.1", "--port", str(port)],
        )
        wait_streaming(url, [engine])
        return url, [engine], None
    launcher = run.spawn("up", [*py, "up", "-f", str(manifest_path), "--host", "127.0.0.1", "--port", str(port)])
    wait_streaming(url, [launcher], timeout=120)
    return url, list(stack_processes(launcher)), launcher


def report(
    rows: dict[tuple[str, int], dict[str, float]], args: argparse.Namespace, loads: tuple[str, str], head: str
) -> None:
    cpu = cpu_model()
    print(
        f"\nmachine: {os.cpu_count()} cpus ({cpu}), python {platform.python_version()}, aiohttp {_version('aiohttp')};"
        f" load average before {loads[0]}, after {loads[1]}"
    )
    print(
        f"ModelFleet dataplane from the {args.source} (HEAD {head}); 1 fake upstream ({args.chunks} SSE chunks + usage"
        f" + [DONE], at once); engine maxNumSeqs {args.max_num_seqs or 'default'}; {args.clients} load-generator"
        f" process(es); {args.warmup:g} s warm-up + {args.duration:g} s measured per level; nothing pinned"
    )
    print(
        f"{'contender':<11} {'streams':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'TTFB p50':>8} {'TTFB p99':>8}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'added p50':>9} {'added p99':>9} {'cpu ms/req':>10} {'gen cpu%':>8}"
    )
    for name in args.contenders:
        for c in args.levels:
            r = rows.get((name, c))
            if r is None:
                continue
            base = rows.get((DIRECT, c))
            if base and name != DIRECT:
                added = f"{r['p50'] - base['p50']:>9.3f} {r['p99'] - base['p99']:>9.3f}"
            else:
                added = f"{'':>9} {'':>9}"
            cpu_req = f"{_cpu_per_req(r, 'router_cpu'):>10.3f}" if name != DIRECT else f"{'':>10}"
            print(
                f"{name:<11} {c:>7} {int(r['requests']):>8} {int(r['errors']):>6} {r['rps']:>7.0f}"
                f" {r['ttfb50']:>8.3f} {r['ttfb99']:>8.3f} {r['p50']:>8.3f} {r['p99']:>8.3f} {added}"
                f" {cpu_req} {r['client_cpu']:>8.0f}"
            )
    for name in (ENGINE, FULL):
        for c in args.levels:
            r = rows.get((name, c))
            if r is None:
                continue
            split = ", ".join(
                f"{k[4:]} {_cpu_per_req(r, k):.3f}" for k, v in r.items() if k.startswith("cpu:") and v > 0
            )
            print(f"{name} at {c} streams, CPU ms/req by process: {split}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 32], help="concurrent streams")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument("--chunks", type=int, default=16, help="SSE content chunks per stream")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        help="the manifest's engine.maxNumSeqs (default: unset, the spec's default; streams beyond it wait in the engine)",
    )
    parser.add_argument(
        "--ref",
        help="run ModelFleet from this git commit (git archive into a temporary directory) instead of the working tree",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the engine contender under cProfile and write engine.prof here (the full stack's processes are not profiled)",
    )
    args = parser.parse_args()
    if DIRECT in args.contenders:  # the baseline first
        args.contenders = [DIRECT, *[c for c in args.contenders if c != DIRECT]]

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the finally below stops every process, as on Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    run, load_before = start_run(args)
    rows: dict[tuple[str, int], dict[str, float]] = {}
    launcher: Proc | None = None
    kids: list[Descendant] = []
    try:
        port = free_port()
        run.spawn(
            "upstream",
            [
                sys.executable,
                str(ROOT / "bench" / "fake_upstream.py"),
                "--port",
                str(port),
                "--chunks",
                str(args.chunks),
            ],
        )
        upstream = f"http://127.0.0.1:{port}"
        wait_streaming(upstream, run.procs)
        manifest_path = run.workdir / "remote.yaml"
        manifest_path.write_text(manifest(upstream, args.max_num_seqs))
        for name in args.contenders:
            url, procs, launcher = start_contender(run, name, upstream, manifest_path, run.profile)
            kids = [p for p in procs if isinstance(p, Descendant)]
            if launcher is not None:
                print(f"  {name}: {', '.join(f'{d.name} {d.pid}' for d in kids)}", file=sys.stderr, flush=True)
            for c in args.levels:
                r = measure([url], c, args.clients, args.warmup, args.duration, procs)  # type: ignore[arg-type]
                rows[(name, c)] = r
                print(
                    f"  {name}: {c} streams, {r['rps']:.0f} req/s, p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms,"
                    f" errors {int(r['errors'])}, contender cpu {r['router_cpu']:.0f}%",
                    file=sys.stderr,
                    flush=True,
                )
            if launcher is not None:
                stop_stack(run, launcher, kids)
                launcher, kids = None, []
            else:
                run.stop([p for p in procs if isinstance(p, Proc)])
    finally:
        if launcher is not None:
            stop_stack(run, launcher, kids)
        run.stop()
    report(rows, args, (load_before, " ".join(f"{x:.2f}" for x in os.getloadavg())), head)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process is stopped by then
        sys.exit(130)
