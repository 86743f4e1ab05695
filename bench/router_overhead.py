"""Router overhead: ModelFleet's gateway + sidecar against sglang-router and vllm-router (issue #5 (a)).

Targets: added p50 latency at most 1 ms; at most 2x the Rust routers' added
p50; at least 0.5x their maximum requests/s.

Every contender sits in front of the same fast fake upstreams
(``bench/fake_upstream.py``, ``--upstreams`` processes, so the routers really
route): each request is a streaming chat completion that the upstream answers
at once with ``--chunks`` SSE chunks, the usage event and ``[DONE]``. The
contenders run one after the other on loopback, all in the same invocation,
measured by the same load generator:

- ``direct``: the load generator talks to the upstreams itself (connections
  spread over them); the baseline that "added" latency is measured against.
- ``mf sidecar``: ModelFleet's coordinator sidecar alone (``modelfleet.dataplane.cli
  sidecar --deployment bench --peer URL ...``, its default least_outstanding policy).
- ``mf gateway+sidecar``: what a ModelFleet client talks to: the gateway
  (``gateway --routes routes.json``, the file ``modelfleet up`` writes) in front of
  that sidecar. Two Python hops.
- ``sglang-router``: ``sglang-router launch --worker-urls ... --policy round_robin``.
- ``vllm-router``: ``vllm-router --worker-urls ... --policy round_robin``.

The load generator is a hand-written HTTP/1.1 client on asyncio Protocols (one
keep-alive connection per concurrent stream, each stream sending its next request
as soon as the last one ended), in ``--clients`` processes. For each concurrency
level it runs ``--warmup`` seconds, then counts for ``--duration`` seconds every
request that ends in the window: requests/s, end-to-end latency (send to last
byte) p50/p99, time to the first body byte p50. Added latency = contender minus
``direct`` at the same level. Maximum requests/s = the highest rps over the
levels. It also reads each contender's and the load generator's CPU time from
/proc over the window.

On a small machine the load generator, the routers and the upstreams share the
cores: the ``direct`` rps is the ceiling of generator + upstreams together, and
a router's rps is bounded by what the cores leave it. Nothing is pinned.

    .venv/bin/python bench/router_overhead.py [--levels 1 64 512] [--duration 10] [--clients 1]

Needs the ``bench`` extra (sglang-router, vllm-router): ``make bench`` installs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "fake"
ADDED_P50_MAX_MS = 1.0
VS_RUST_ADDED_MAX = 2.0
VS_RUST_RPS_MIN = 0.5
RUST = ("sglang-router", "vllm-router")
MF = "mf gateway+sidecar"
CONTENDERS = ("direct", "mf sidecar", MF, *RUST)

REQUEST_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    separators=(",", ":"),
).encode()


# ---- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this benchmark dies; own process group."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgid(0, 0)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def cpu_s(self) -> float:
        return proc_cpu_s(self.popen.pid)


@dataclass
class Running:
    procs: list[Proc] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-router-")))

    pythonpath: str | None = None  # where `modelfleet.dataplane` comes from when --ref is given
    profile: Path | None = None  # --profile: run ModelFleet's processes under cProfile, writing here

    def spawn(self, name: str, cmd: list[str]) -> Proc:
        log = self.workdir / f"{name.replace(' ', '_').replace('/', '_')}.log"
        env = _env() | ({"PYTHONPATH": self.pythonpath} if self.pythonpath else {})
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, env=env, cwd=self.workdir
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc] | None = None) -> None:
        victims = list(self.procs if procs is None else procs)
        for p in victims:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in victims:
            try:
                p.popen.wait(60 if self.profile else 15)  # cProfile writes its file on the way out
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
            if p in self.procs:
                self.procs.remove(p)


def export_ref(ref: str, workdir: Path) -> tuple[str, str]:
    """``dataplane/`` as of git ``ref``, importable as ``modelfleet.dataplane``: (PYTHONPATH, commit)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    dest = workdir / "src" / "modelfleet"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "dataplane"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(workdir / "src"), commit


def _env() -> dict[str, str]:
    # the routers' Rust HTTP clients would otherwise honour a proxy for loopback
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return env | {"NO_PROXY": "*", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RUST_LOG": "warn"}


def _post_ok(url: str) -> bool:
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=REQUEST_BODY, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200 and b"[DONE]" in resp.read()
    except (OSError, urllib.error.HTTPError):
        return False


def wait_streaming(url: str, procs: list[Proc], timeout: float = 90.0) -> None:
    """Until a streaming chat completion through ``url`` comes back whole."""
    deadline = time.monotonic() + timeout
    while not _post_ok(url):
        for p in procs:
            if p.popen.poll() is not None:
                raise SystemExit(
                    f"{p.name} exited with {p.popen.returncode}; log: {p.log}\n{p.log.read_text()[-3000:]}"
                )
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not serve a stream within {timeout:.0f} s")
        time.sleep(0.2)


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed: `make bench` installs the bench extra")
    return found


def _listen(port: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]


def start_contender(run: Running, name: str, upstreams: list[str]) -> tuple[list[str], list[Proc]]:
    """Start one contender in front of ``upstreams``; returns (URLs the load generator uses, its processes)."""
    if name == "direct":
        return upstreams, []
    py = [sys.executable, "-m", "modelfleet.dataplane.cli"]
    if run.profile is not None:
        tag = name.replace(" ", "_").replace("+", "_")
        py_for = {
            role: [sys.executable, __file__, PROFILED, str(run.profile / f"{tag}.{role}.prof")]
            for role in ("sidecar", "gateway")
        }
    else:
        py_for = {"sidecar": py, "gateway": py}
    peers = [a for u in upstreams for a in ("--peer", u)]
    if name in ("mf sidecar", MF):
        sport = free_port()
        sidecar = run.spawn(
            "mf-sidecar",
            [*py_for["sidecar"], "sidecar", "--deployment", "bench", *peers, *_listen(sport)],
        )
        surl = f"http://127.0.0.1:{sport}"
        if name == "mf sidecar":
            wait_streaming(surl, [sidecar])
            return [surl], [sidecar]
        routes = run.workdir / "routes.json"
        routes.write_text(
            json.dumps({"deployments": [{"name": "bench", "models": [MODEL], "endpoints": [surl], "created": 0}]})
        )
        gport = free_port()
        gateway = run.spawn(
            "mf-gateway",
            [*py_for["gateway"], "gateway", "--routes", str(routes), *_listen(gport)],
        )
        gurl = f"http://127.0.0.1:{gport}"
        wait_streaming(gurl, [sidecar, gateway])
        return [gurl], [gateway, sidecar]
    port, metrics_port = free_port(), free_port()
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *upstreams, "--policy", "round_robin"]
    common += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if name == "sglang-router":
        cmd = [tool("sglang-router"), "launch", *common, "--log-level", "warn"]
    elif name == "vllm-router":
        cmd = [tool("vllm-router"), *common, "--log-level", "warning"]
    else:
        raise ValueError(name)
    proc = run.spawn(name, cmd)
    url = f"http://127.0.0.1:{port}"
    wait_streaming(url, [proc])
    return [url], [proc]


# ---- load generator ----------------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time; parses chunked or sized bodies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[bool] | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("closed")
        if self.done is not None and not self.done.done():
            self.done.set_exception(self.lost)

    def send(self, request: bytes) -> asyncio.Future[bool]:
        assert self.transport is not None
        if self.lost is not None:
            raise self.lost
        self.buf = b""
        self.in_body = False
        self.status = 0
        self.chunked = False
        self.remaining = 0  # sized body: bytes left; chunked: bytes left in the current chunk (+2 for CRLF)
        self.tail = b""
        self.first_body: float = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            return
        buf = self.buf + data
        if not self.in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
                elif name == b"content-length":
                    self.remaining = int(value)
            self.in_body = True
            buf = buf[end + 4 :]
        if buf and not self.first_body:
            self.first_body = time.perf_counter()
        if not self.chunked:
            self.remaining -= len(buf)
            self.tail = (self.tail + buf)[-64:]
            self.buf = b""
            if self.remaining <= 0:
                self.done.set_result(self.status == 200 and b"[DONE]" in self.tail)
            return
        pos = 0
        while True:
            if self.remaining:
                take = min(self.remaining, len(buf) - pos)
                self.tail = (self.tail + buf[pos : pos + take])[-64:]
                pos += take
                self.remaining -= take
                if self.remaining:
                    break
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) < eol + 4:  # the CRLF that ends the (empty) trailers
                    break
                self.buf = b""
                self.done.set_result(self.status == 200 and b"[DONE]" in self.tail)
                return
            pos = eol + 2
            self.remaining = size + 2
        self.buf = buf[pos:]


async def _stream_loop(
    host: str, port: int, request: bytes, until: float, out: list[tuple[float, float, float]], errors: list[int]
) -> None:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, host, port)
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            ok = await conn.send(request)
        except (OSError, ConnectionError):
            errors.append(1)
            _, conn = await loop.create_connection(_Conn, host, port)
            continue
        end = time.perf_counter()
        if not ok:
            errors.append(1)
            continue
        out.append((start, conn.first_body, end))
    assert conn.transport is not None
    conn.transport.close()


async def _client(
    urls: list[str], streams: int, offset: int, at: float, warmup: float, duration: float
) -> dict[str, object]:
    targets = []
    for i in range(streams):
        host, port = urls[(offset + i) % len(urls)].removeprefix("http://").split(":")
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"accept: text/event-stream\r\ncontent-length: {len(REQUEST_BODY)}\r\n\r\n"
        ).encode() + REQUEST_BODY
        targets.append((host, int(port), request))
    await asyncio.sleep(max(0.0, at - time.time()))
    now = time.perf_counter()
    lo, hi = now + warmup, now + warmup + duration
    out: list[tuple[float, float, float]] = []
    errors: list[int] = []
    cpu0 = time.process_time()
    await asyncio.gather(*(_stream_loop(h, p, r, hi, out, errors) for h, p, r in targets))
    cpu = time.process_time() - cpu0
    window = [(e - s, f - s) for s, f, e in out if lo <= e < hi]
    return {"lat": window, "errors": len(errors), "cpu_s": cpu * duration / (warmup + duration + 1e-9)}


def client_process(
    urls: list[str], streams: int, offset: int, at: float, warmup: float, duration: float
) -> dict[str, object]:
    return asyncio.run(_client(urls, streams, offset, at, warmup, duration))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure(
    urls: list[str], streams: int, clients: int, warmup: float, duration: float, procs: list[Proc]
) -> dict[str, float]:
    n = min(clients, streams)
    shares = [streams // n + (1 if i < streams % n else 0) for i in range(n)]
    at = time.time() + 0.5
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
        offsets = [sum(shares[:i]) for i in range(n)]
        futures = [
            pool.submit(client_process, urls, s, o, at, warmup, duration) for s, o in zip(shares, offsets, strict=True)
        ]
        time.sleep(max(0.0, at + warmup - time.time()))
        cpu_start = [p.cpu_s() for p in procs]
        time.sleep(duration)
        cpu_end = [p.cpu_s() for p in procs]
        parts = [f.result() for f in futures]
    lat = [x for part in parts for x in part["lat"]]  # type: ignore[attr-defined]
    e2e = [x[0] for x in lat]
    ttfb = [x[1] for x in lat]
    return {
        "requests": len(lat),
        "errors": sum(int(part["errors"]) for part in parts),  # type: ignore[call-overload]
        "rps": len(lat) / duration,
        "p50": pct(e2e, 0.5) * 1000,
        "p99": pct(e2e, 0.99) * 1000,
        "ttfb50": pct(ttfb, 0.5) * 1000,
        "ttfb99": pct(ttfb, 0.99) * 1000,
        "router_cpu": sum(b - a for a, b in zip(cpu_start, cpu_end, strict=True)) / duration * 100,
        **{f"cpu:{p.name}": (b - a) / duration * 100 for p, a, b in zip(procs, cpu_start, cpu_end, strict=True)},
        "client_cpu": sum(float(part["cpu_s"]) for part in parts) / duration * 100,  # type: ignore[arg-type]
    }


# ---- report ------------------------------------------------------------------------------------


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"


def _cpu_per_req(r: dict[str, float], key: str) -> float:
    """CPU milliseconds per completed request: steadier than rps when other work shares the cores."""
    return r[key] / 100 / r["rps"] * 1000 if r["rps"] else float("nan")


def report(
    rows: dict[tuple[str, int], dict[str, float]], levels: list[int], args: argparse.Namespace, loads: tuple[str, str]
) -> None:
    cpu = cpu_model()
    print(
        f"\nmachine: {os.cpu_count()} cpus ({cpu}), python {platform.python_version()}; load average before {loads[0]}, after {loads[1]}"
    )
    print(
        f"versions: sglang-router {_version('sglang-router')}, vllm-router {_version('vllm-router')}, aiohttp {_version('aiohttp')},"
        f" fastapi {_version('fastapi')}, uvicorn {_version('uvicorn')}; ModelFleet dataplane from the {args.source}"
    )
    print(
        f"{args.upstreams} fake upstreams ({args.chunks} SSE chunks + usage + [DONE], at once); {args.clients} load-generator"
        f" process(es); {args.warmup:g} s warm-up + {args.duration:g} s measured per level; nothing pinned: the"
        f" generator, the contender and the upstreams share the {os.cpu_count()} cores"
    )
    print(
        f"{'contender':<20} {'streams':>7} {'requests':>9} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'TTFB p50':>9} {'added p50':>10} {'added p99':>10} {'router cpu%':>11} {'cpu ms/req':>10} {'gen cpu%':>8}"
    )
    for name in args.contenders:
        for c in levels:
            r = rows.get((name, c))
            if r is None:
                continue
            base = rows.get(("direct", c))
            add50 = f"{r['p50'] - base['p50']:>10.3f}" if base and name != "direct" else f"{'':>10}"
            add99 = f"{r['p99'] - base['p99']:>10.3f}" if base and name != "direct" else f"{'':>10}"
            print(
                f"{name:<20} {c:>7} {int(r['requests']):>9} {int(r['errors']):>6} {r['rps']:>8.0f} {r['p50']:>8.3f} {r['p99']:>8.3f}"
                f" {r['ttfb50']:>9.3f} {add50} {add99} {r['router_cpu']:>11.0f} {_cpu_per_req(r, 'router_cpu'):>10.3f}"
                f" {r['client_cpu']:>8.0f}"
            )
    for c in levels:
        r = rows.get((MF, c))
        if r is not None:
            split = ", ".join(
                f"{k[4:]} {v:.0f}% = {_cpu_per_req(r, k):.3f} ms/req" for k, v in r.items() if k.startswith("cpu:")
            )
            print(f"{MF} at {c} streams, CPU by process: {split}")
    if "direct" in args.contenders:
        print(
            f"load generator ceiling (direct, no router): {max(rows[('direct', c)]['rps'] for c in levels):.0f} req/s;"
            " a contender near it is bounded by the generator and upstreams, not by itself"
        )
    verdicts(rows, levels, args.contenders)


def verdicts(rows: dict[tuple[str, int], dict[str, float]], levels: list[int], contenders: list[str]) -> None:
    if MF not in contenders or "direct" not in contenders:
        return

    def added(name: str, c: int) -> float:
        return rows[(name, c)]["p50"] - rows[("direct", c)]["p50"]

    rust = [r for r in RUST if r in contenders]
    print("targets (ModelFleet = gateway+sidecar):")
    for c in levels:
        ours = added(MF, c)
        line = f"  {c:>4} streams: added p50 {ours:.3f} ms (<= {ADDED_P50_MAX_MS} ms: {'MET' if ours <= ADDED_P50_MAX_MS else 'MISSED'})"
        for r in rust:
            theirs = added(r, c)
            ratio = ours / theirs if theirs > 0 else float("inf")
            ok = ours <= VS_RUST_ADDED_MAX * max(theirs, 0.0)
            line += f"; vs {r} {theirs:.3f} ms = {ratio:.1f}x (<= {VS_RUST_ADDED_MAX:g}x: {'MET' if ok else 'MISSED'})"
        print(line)
    ours_max = max(rows[(MF, c)]["rps"] for c in levels)
    line = f"  max req/s: {ours_max:.0f}"
    for r in rust:
        theirs_max = max(rows[(r, c)]["rps"] for c in levels)
        ratio = ours_max / theirs_max
        line += f"; vs {r} {theirs_max:.0f} = {ratio:.2f}x (>= {VS_RUST_RPS_MIN:g}x: {'MET' if ratio >= VS_RUST_RPS_MIN else 'MISSED'})"
    print(line)


# ---- main --------------------------------------------------------------------------------------


PROFILED = "_profiled"


def run_profiled(out: str, argv: list[str]) -> None:
    """``modelfleet.dataplane.cli`` under cProfile, writing ``out`` however it stops.

    uvicorn re-raises SIGTERM after its graceful shutdown, so ``python -m cProfile``
    would die before writing; the handler installed here runs instead.
    """
    import cProfile

    from modelfleet.dataplane.cli import main as cli_main

    prof = cProfile.Profile()

    def dump(*_: object) -> None:
        prof.disable()
        prof.dump_stats(out)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    prof.enable()
    try:
        cli_main(argv)
    finally:
        dump()


def start_upstreams(run: Running, count: int, chunks: int) -> list[tuple[str, Proc]]:
    """``count`` fake upstreams (bench/fake_upstream.py), each streaming ``chunks`` chunks, answering."""
    started = []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(port), "--chunks", str(chunks)]
        started.append((f"http://127.0.0.1:{port}", run.spawn(f"upstream-{port}", cmd)))
    for url, _ in started:
        wait_streaming(url, run.procs)
    return started


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture when it has none), for report headers."""
    return next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.machine(),
    )


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_run(args: argparse.Namespace) -> tuple[Running, str]:
    """A run's process registry, with ``--ref`` exported and ``--profile`` prepared; and the load average now.
    Sets ``args.source`` (what code runs) for the report. Shared with bench/remote_overhead.py."""
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run = Running()
    args.source = "working tree"
    if args.ref:
        run.pythonpath, commit = export_ref(args.ref, run.workdir)
        args.source = f"git {args.ref} = {commit}"
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        run.profile = args.profile.resolve()
    return run, load_before


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == PROFILED:
        return run_profiled(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 64, 512], help="concurrent streams")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument("--upstreams", type=int, default=2, help="fake upstream processes")
    parser.add_argument("--chunks", type=int, default=16, help="SSE content chunks per stream")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--ref",
        help="run ModelFleet's gateway and sidecar from this git commit (git archive into a temporary directory)"
        " instead of the working tree, e.g. HEAD while dataplane/ is being edited",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run ModelFleet's gateway and sidecar under cProfile and write <contender>.<role>.prof files here",
    )
    args = parser.parse_args()
    if "direct" in args.contenders:  # the baseline first, the rest in the order asked
        args.contenders = ["direct", *[c for c in args.contenders if c != "direct"]]
    run, load_before = start_run(args)
    rows: dict[tuple[str, int], dict[str, float]] = {}
    try:
        upstreams = [url for url, _ in start_upstreams(run, args.upstreams, args.chunks)]
        for name in args.contenders:
            urls, procs = start_contender(run, name, upstreams)
            for c in args.levels:
                r = measure(urls, c, args.clients, args.warmup, args.duration, procs)
                rows[(name, c)] = r
                print(
                    f"  {name}: {c} streams, {r['rps']:.0f} req/s, p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms,"
                    f" errors {int(r['errors'])}, contender cpu {r['router_cpu']:.0f}%",
                    file=sys.stderr,
                    flush=True,
                )
            run.stop(procs)
    finally:
        run.stop()
    report(rows, args.levels, args, (load_before, " ".join(f"{x:.2f}" for x in os.getloadavg())))


if __name__ == "__main__":
    main()
