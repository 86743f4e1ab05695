"""Shared code of the runners that start an engine's own OpenAI-compatible server (vLLM, SGLang).

The server is a one-shot child process: started by ``load_weights``, started
afresh by ``rebuild_session``, and never restarted by the runner on its own.
When the child exits, the next request finds it gone and raises
``ContextFaultError``; the engine worker's supervision then calls
``rebuild_session`` once (with its backoff) and resubmits every request that
had not started streaming. A request that was mid-stream when the child died
ends with an error (its text cannot be resumed without repeating what the
client already has).

These runners are of the ``openai_passthrough`` family: the engine hands
``open`` the client's body (rewritten only as docs/openai-api.md lists) and
relays the child's answer byte for byte. The body goes with aiohttp over a
Unix socket where the engine can listen on one, else to a free loopback port.
The child serves one name: the deployment's ``model.name``; aliases are
resolved by the engine in front of it.

Install check: the engine's command-line program is looked up next to this
interpreter (the same virtual environment) and then on PATH; when it is
missing, ``load_weights`` fails with the pip extra to install.

Status: ``progress`` says what the child is doing (starting, waiting for
/health, serving, exited); ``runtime_stats`` counts starts and exits (exported
by the engine's /metrics); ``disk_usage`` is the size of the weights on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncGenerator, Coroutine, Sequence
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from modelfleet.dataplane.modelfiles import WeightSourceError, source_file_or_dir
from modelfleet.dataplane.runners.base import (
    CHAT,
    COMPLETIONS,
    BackendResponse,
    ContextFaultError,
    DeviceContext,
    OpenAICall,
    RunnerCapabilities,
    RunnerError,
    RunnerFamily,
    RuntimeKind,
    SessionRebuildCause,
    TransportKind,
    WeightSource,
)
from modelfleet.dataplane.runners.openai_stream import StreamBrokenError, body_chunks
from modelfleet.dataplane.spec import DType, InferenceDeploymentSpec

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
HEALTH_PATH = "/health"  # both vLLM and SGLang answer 200 here once the model is loaded
STOP_GRACE_S = 20.0  # SIGTERM, then SIGKILL of the child's process group
OUTPUT_LINES = 40  # the child's last lines, quoted when it fails to start
KEPT_HEADERS = frozenset({"content-type", "retry-after"})  # of the child's answer; the rest is the engine's own


def dtype_flag(dtype: DType) -> str:
    """The spec's dtype as both engines spell it (their ``--dtype`` choices include all four)."""
    return dtype.value


def tensor_parallel_size(spec: InferenceDeploymentSpec) -> int:
    return spec.placement.gpus_per_replica or 1


def model_argument(spec: InferenceDeploymentSpec) -> str:
    """What the engine loads: a repo id (it reads the Hugging Face cache itself) or a local path."""
    source = spec.model.source
    if source.runtime_managed:
        return spec.model.name  # the engine fetches the repo named like the served model
    if source.hugging_face is not None:
        return source.hugging_face.repo
    if source.path is not None:
        return source.path
    try:
        return str(source_file_or_dir(source))  # a file shipped by a Python package
    except WeightSourceError as exc:
        raise RunnerError(f"model.source: {exc}") from None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the engines find it (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def weights_dir(spec: InferenceDeploymentSpec) -> Path | None:
    """Where the weights lie on disk: the path, or the repo's folder in the hub cache; None when unknown."""
    source = spec.model.source
    if source.path is not None:
        return Path(source.path).expanduser()
    if source.python_package is not None:
        with contextlib.suppress(WeightSourceError, ImportError):
            return source_file_or_dir(source)
        return None
    repo = source.hugging_face.repo if source.hugging_face is not None else spec.model.name
    return hub_cache_dir() / ("models--" + repo.replace("/", "--"))


def du_bytes(path: Path) -> int:
    """Bytes allocated on disk under path, like ``du -s`` (symlinks not followed; hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path) if path.is_dir() else [(str(path.parent), [], [path.name])]:
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class EngineServerRunner:
    """A vLLM or SGLang OpenAI server as a child process. Subclasses say how to start it."""

    runtime_kind: RuntimeKind  # set by each subclass
    program: ClassVar[str]  # the engine's command-line program
    extra: ClassVar[str]  # the pip extra that installs it
    supports_uds: ClassVar[bool]  # the server can listen on a Unix socket
    metrics_prefix: ClassVar[str] = "vllm:"  # the model-server metric families its /metrics carries
    gil_pinned = False  # the engine computes in its own processes
    # the child is the OpenAI server: the engine relays the client's request and its answer (docs/openai-api.md);
    # it serves one model, so a request for another one is 421 (docs/runners.md)
    capabilities = RunnerCapabilities(
        family=RunnerFamily.OPENAI_PASSTHROUGH, endpoints=frozenset({CHAT, COMPLETIONS}), one_model_per_process=True
    )

    def __init__(
        self,
        spec: InferenceDeploymentSpec,
        *,
        startup_timeout_s: float = 1800.0,
        first_byte_timeout_s: float = 600.0,
    ) -> None:
        self.spec = spec
        self.startup_timeout_s = startup_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.transport_kind = TransportKind.UNIX_SOCKET if self.supports_uds else TransportKind.HTTP
        self.progress = "not started"
        self.proc: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None
        self._stopping = False  # this runner is stopping its child: its exit is no fault
        self._endpoint: str | int | None = None  # socket path or port
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self._tasks: set[asyncio.Task[None]] = set()
        self._disk: int | None = None
        self.stats: dict[str, float] = {
            "server_starts": 0,
            "server_exits": 0,
            "upstream_requests": 0,
            "upstream_errors": 0,
        }

    # ---- what a subclass provides ----------------------------------------------------------------------------
    @staticmethod
    def command(spec: InferenceDeploymentSpec, endpoint: str | int) -> list[str]:
        """The child's argv: ``endpoint`` is a Unix socket path (str) or a loopback port (int)."""
        raise NotImplementedError

    def launch_argv(self, program: str, endpoint: str | int) -> list[str]:
        """The argv actually started: ``command`` with its program name replaced by the one found."""
        return [program, *self.command(self.spec, endpoint)[1:]]

    def child_env(self) -> dict[str, str]:
        """The child's environment: this process's, plus what the engine needs."""
        env = dict(os.environ)
        if self.spec.model.source.hugging_face is not None:
            env["HF_HUB_OFFLINE"] = "1"  # huggingFace sources come from the local cache only
        return env

    async def prepare_weights(self) -> None:
        """Anything the child needs on disk before it starts (a subclass converts weights here)."""
        return None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def find_program(self) -> str:
        """The engine's program in this interpreter's environment, else on PATH; RunnerError naming the extra."""
        beside = Path(sys.executable).parent / self.program
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
        found = shutil.which(self.program)
        if found is None:
            raise RunnerError(
                f"runtime {self.runtime_kind.value} needs the {self.program} server, which is not installed here: "
                f"pip install 'modelfleet[{self.extra}]' (a CUDA build; it needs a GPU)"
            )
        return found

    async def load_weights(self, ctx: DeviceContext | None, source: WeightSource) -> None:
        """Start the server and wait until it answers /health."""
        program = self.find_program()
        await self.prepare_weights()
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="mf-")  # short: Unix socket paths max 107 bytes
        endpoint: str | int = (
            os.path.join(self._tmpdir.name, f"{self.program}.sock") if self.supports_uds else free_loopback_port()
        )
        with contextlib.suppress(FileNotFoundError):
            if isinstance(endpoint, str):
                os.unlink(endpoint)
        argv = self.launch_argv(program, endpoint)
        env = self.child_env()
        self._endpoint = endpoint
        self.exit_code = None
        self._stopping = False
        self._output.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=self._tmpdir.name,  # not the caller's folder: a checkout's files must not shadow the engine's imports
            start_new_session=True,  # its own process group: stopping it stops its workers too
        )
        self.stats["server_starts"] += 1
        where = self.where()
        log.info("started %s (pid %d) on %s: %s", self.program, self.proc.pid, where, " ".join(argv))
        self._spawn(self._pump(self.proc))
        self._spawn(self._watch(self.proc))
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=endpoint, limit=0)
            if isinstance(endpoint, str)
            else aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        )
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        await self._wait_ready()
        self.progress = f"serving {self.spec.model.name} with {self.program} (pid {self.proc.pid}) on {where}"
        if self._disk is None:
            self._disk = await asyncio.to_thread(self.disk_usage)

    def last_output(self) -> str:
        """What the child said last, shortened for a progress line (its log prefix dropped)."""
        for line in reversed(self._output):
            text = line.strip()
            if not text:
                continue
            # vLLM: "(APIServer pid=12) INFO 12-06 03:57:23 [file.py:317] message"
            if "] " in text and text.startswith("("):
                text = text.split("] ", 1)[1]
            return text[:100]
        return "loading"

    async def model_server_metrics(self) -> str:
        """The child's own /metrics, only the families named with ``metrics_prefix`` (vLLM: ``vllm:``)."""
        if self._session is None:
            return ""
        async with self._session.get(f"{self.base_url()}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return ""
            text = await resp.text()
        keep = []
        for line in text.splitlines():
            name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
            if name.startswith(self.metrics_prefix):
                keep.append(line)
        return "\n".join(keep) + "\n" if keep else ""

    def where(self) -> str:
        return f"unix:{self._endpoint}" if isinstance(self._endpoint, str) else f"{LOOPBACK}:{self._endpoint}"

    def base_url(self) -> str:
        return "http://localhost" if isinstance(self._endpoint, str) else f"http://{LOOPBACK}:{self._endpoint}"

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """The child's output into this process's log (and the last lines kept for error messages)."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            log.info("[%s %d] %s", self.program, proc.pid, line)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is not self.proc:
            return  # a child this runner already replaced
        self.exit_code = code
        self.stats["server_exits"] += 1
        self.progress = f"{self.program} (pid {proc.pid}) exited with code {code}"
        if self._stopping:
            log.info("%s (stopped by the engine)", self.progress)
        else:
            log.error("%s; the engine worker rebuilds it when the next request arrives", self.progress)

    async def _wait_ready(self) -> None:
        assert self.proc is not None and self._session is not None
        started = time.monotonic()
        url = self.base_url() + HEALTH_PATH
        while True:
            waited = time.monotonic() - started
            if self.proc.returncode is not None:
                await asyncio.sleep(0.1)  # let the output pump catch the last lines
                tail = "\n".join(list(self._output)[-10:])
                raise RunnerError(
                    f"{self.program} exited with code {self.proc.returncode} while starting; its last output:\n{tail}"
                )
            if waited > self.startup_timeout_s:
                await self._stop()
                raise RunnerError(f"{self.program} did not answer {HEALTH_PATH} within {self.startup_timeout_s:g} s")
            self.progress = (
                f"starting {self.program} (pid {self.proc.pid}) on {self.where()}, "
                f"{10 * int(waited // 10)} s: {self.last_output()}"
            )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.5)

    async def rebuild_session(self, cause: SessionRebuildCause) -> None:
        """Stop what is left of the child and start a fresh one (the engine worker calls this after a fault)."""
        log.warning("starting a fresh %s (%s)", self.program, cause.value)
        await self._stop()
        await self.load_weights(None, self.spec.model.source)

    async def _stop(self) -> None:
        self._stopping = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):  # workers the server left behind
                os.killpg(proc.pid, signal.SIGKILL)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self._stop()
        self.proc = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # ---- what the engine reads ---------------------------------------------------------------------------------
    @property
    def backend_model(self) -> str:
        return self.spec.model.name  # the child serves this name (aliases are resolved by the engine in front)

    def disk_usage(self) -> int | None:
        """Bytes the weights take on disk (the path, or the repo's hub-cache folder); None when not there."""
        where = weights_dir(self.spec)
        if where is None or not where.exists():
            return None
        return du_bytes(where)

    def runtime_stats(self) -> dict[str, float]:
        stats = dict(self.stats)
        stats["server_up"] = float(self.proc is not None and self.proc.returncode is None)
        if self._disk is not None:
            stats["weights_disk_bytes"] = float(self._disk)
        return stats

    # ---- the call ---------------------------------------------------------------------------------------------
    def _gone(self) -> ContextFaultError | None:
        proc = self.proc
        if proc is None or proc.returncode is None:
            return None
        return ContextFaultError(
            f"the {self.program} server (pid {proc.pid}) exited with code {proc.returncode}",
            SessionRebuildCause.DEVICE_CONTEXT_POISONED,
        )

    async def _died(self) -> ContextFaultError | None:
        """After a connection failure: whether the child is gone (given a moment to be reaped)."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
        return self._gone()

    async def open(self, call: OpenAICall) -> BackendResponse:
        """POST the call's body to the child; its answer (any status) as a BackendResponse."""
        fault = self._gone()
        if fault is not None:
            raise fault
        session = self._session
        if session is None:
            raise RunnerError(f"the {self.program} server is not started")
        self.stats["upstream_requests"] += 1
        try:
            resp = await asyncio.wait_for(
                session.post(
                    self.base_url() + call.path,
                    data=call.body,
                    headers={
                        "content-type": "application/json",
                        "accept": "text/event-stream" if call.stream else "application/json",
                        "x-request-id": call.request_id,
                    },
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=self.first_byte_timeout_s),
                ),
                self.first_byte_timeout_s,
            )
        except (aiohttp.ClientError, OSError) as exc:
            self.stats["upstream_errors"] += 1
            fault = await self._died()
            if fault is not None:
                raise fault from None
            raise RunnerError(f"the {self.program} server could not be reached ({type(exc).__name__})") from None
        except TimeoutError:
            self.stats["upstream_errors"] += 1
            raise RunnerError(
                f"the {self.program} server sent nothing within {self.first_byte_timeout_s:g} s"
            ) from None
        if resp.status != 200:
            self.stats["upstream_errors"] += 1
        headers = {k: v for k, v in resp.headers.items() if k.lower() in KEPT_HEADERS}

        async def close() -> None:
            resp.close()

        return BackendResponse(resp.status, headers, self._relay(resp), close=close)

    async def _relay(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes]:
        """The child's body; a child that died before any byte is a context fault (the request is resubmitted
        after the rebuild), after some bytes a failure of this response only."""
        started = False
        try:
            async for data in body_chunks(resp):
                started = True
                yield data
        except StreamBrokenError as exc:
            fault = await self._died()
            if fault is None:
                raise RunnerError(f"the {self.program} server's stream broke: {exc}") from None
            if started:  # its bytes were handed out already: it cannot be resumed, only failed
                raise RunnerError(f"{fault} in the middle of this response") from None
            raise fault from None
        finally:
            resp.close()


def flag_pairs(flags: Sequence[tuple[str, object | None]]) -> list[str]:
    """``--flag value`` for every pair whose value is not None."""
    out: list[str] = []
    for flag, value in flags:
        if value is not None:
            out += [flag, str(value)]
    return out
