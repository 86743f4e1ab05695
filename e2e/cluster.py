"""A real Kubernetes control plane for ModelFleet's tests, without Docker.

``ControlPlane`` starts etcd and kube-apiserver (optionally kube-controller-manager,
kube-scheduler and kwok for fake nodes) as plain processes on free loopback ports
in a temporary directory, the way controller-runtime's envtest does.  The
binaries come from ``scripts/k8s-install.sh``; they are looked up in
``$MODELFLEET_K8S_BIN`` or, by default,
``${MODELFLEET_CACHE:-~/.cache/modelfleet}/k8s/<version>/bin``.

Stdlib only (TLS material is made with ``cryptography`` when it is importable,
else with the ``openssl`` CLI).

Example::

    with ControlPlane(controller_manager=True, scheduler=True, kwok=True) as cp:
        cp.apply(fake_gpu_node("gpu-0", gpu_count=8))
        print(cp.kubectl("get", "nodes", "-o", "wide").stdout)
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_K8S_VERSION",
    "KWOK_NODE_ANNOTATION",
    "ControlPlane",
    "ControlPlaneError",
    "MissingBinariesError",
    "binary_dir",
    "fake_gpu_node",
    "free_port",
    "kubeconfig_yaml",
    "port_is_listening",
    "write_kubeconfig",
]

DEFAULT_K8S_VERSION = "v1.37.2"
#: The versions scripts/k8s-install.sh installs (the same env vars override both); the harness
#: refuses binaries of other versions, so a stale or hand-placed binary cannot pass unnoticed.
ETCD_VERSION = os.environ.get("MODELFLEET_ETCD_VERSION", "v3.6.16")
KWOK_VERSION = os.environ.get("MODELFLEET_KWOK_VERSION", "v0.8.0")
#: Nodes carrying this annotation (``kwok.x-k8s.io/node: fake``) are managed by kwok.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_IP_KUBERNETES = "10.0.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

_INSTALL_HINT = "run `scripts/k8s-install.sh` (it builds/installs them into the cache)"


class ControlPlaneError(RuntimeError):
    """A component failed to start or to become ready."""


class MissingBinariesError(ControlPlaneError):
    """The control-plane binaries are not installed."""


# --------------------------------------------------------------------------- paths


def binary_dir(version: str = DEFAULT_K8S_VERSION) -> Path:
    """Directory holding kube-apiserver, etcd, kubectl, ... (not checked)."""
    env = os.environ.get("MODELFLEET_K8S_BIN")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("MODELFLEET_CACHE") or Path.home() / ".cache" / "modelfleet")
    return cache.expanduser() / "k8s" / version / "bin"


def _kwok_stages_dir(bin_dir: Path) -> Path:
    env = os.environ.get("MODELFLEET_KWOK_STAGES")
    return Path(env).expanduser() if env else bin_dir.parent / "share" / "kwok-stages"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_listening(port: int) -> bool:
    """True if something still listens on 127.0.0.1:``port``.

    SO_REUSEADDR makes sockets left in TIME_WAIT (closed connections) not count,
    just as they do not stop a Go server from listening on the port again.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


# ----------------------------------------------------------------------- kubeconfig


def kubeconfig_yaml(
    server: str,
    ca_pem: bytes,
    token: str,
    *,
    user: str = "user",
    cluster: str = "modelfleet-test",
    namespace: str | None = None,
    tls_server_name: str | None = None,
) -> str:
    """A kubeconfig (YAML) authenticating with a bearer ``token``.

    ``tls_server_name``: the name to verify the server certificate against when
    ``server`` is an address the certificate does not name (a forwarded port).
    """
    ca_b64 = base64.b64encode(ca_pem).decode()
    ns = f"\n    namespace: {json.dumps(namespace)}" if namespace else ""
    sni = f"\n    tls-server-name: {json.dumps(tls_server_name)}" if tls_server_name else ""
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: {json.dumps(cluster)}\n"
        "  cluster:\n"
        f"    server: {json.dumps(server)}\n"
        f"    certificate-authority-data: {ca_b64}{sni}\n"
        "users:\n"
        f"- name: {json.dumps(user)}\n"
        "  user:\n"
        f"    token: {json.dumps(token)}\n"
        "contexts:\n"
        f"- name: {json.dumps(cluster)}\n"
        "  context:\n"
        f"    cluster: {json.dumps(cluster)}\n"
        f"    user: {json.dumps(user)}{ns}\n"
        f"current-context: {json.dumps(cluster)}\n"
    )


def write_kubeconfig(
    path: str | os.PathLike[str],
    server: str,
    ca_pem: bytes,
    token: str,
    *,
    user: str = "user",
    namespace: str | None = None,
    tls_server_name: str | None = None,
) -> Path:
    """Write :func:`kubeconfig_yaml` to ``path`` (mode 0600) and return it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        kubeconfig_yaml(server, ca_pem, token, user=user, namespace=namespace, tls_server_name=tls_server_name)
    )
    p.chmod(0o600)
    return p


# ------------------------------------------------------------------------ fake nodes


def fake_gpu_node(
    name: str,
    *,
    gpu_count: int = 8,
    gpu_product: str = "NVIDIA-H100-80GB-HBM3",
    gpu_memory_mib: int = 81559,
    zone: str = "zone-a",
    cpu: str = "96",
    memory: str = "1Ti",
    pods: str = "110",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """A Node manifest for a kwok-managed fake GPU node.

    ``taints`` are dicts like ``{"key": "nvidia.com/gpu", "value": "present",
    "effect": "NoSchedule"}``.
    """
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/role": "agent",
        "node-role.kubernetes.io/agent": "",
        "type": "kwok",
        "topology.kubernetes.io/zone": zone,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": gpu_product,
        "nvidia.com/gpu.memory": str(gpu_memory_mib),
        "nvidia.com/gpu.count": str(gpu_count),
    }
    node_labels.update(labels or {})
    node_annotations = {
        KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
        "node.alpha.kubernetes.io/ttl": "0",
    }
    node_annotations.update(annotations or {})
    resources = {"cpu": cpu, "memory": memory, "pods": pods, "nvidia.com/gpu": str(gpu_count)}
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels, "annotations": node_annotations},
        "spec": {},
        "status": {"allocatable": dict(resources), "capacity": dict(resources)},
    }
    if taints:
        node["spec"]["taints"] = [dict(t) for t in taints]
    return node


# ------------------------------------------------------------------------- TLS/keys


@dataclass
class _Pki:
    ca_crt: Path
    ca_key: Path
    serving_crt: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path


def _make_pki(d: Path) -> _Pki:
    d.mkdir(parents=True, exist_ok=True)
    pki = _Pki(
        ca_crt=d / "ca.crt",
        ca_key=d / "ca.key",
        serving_crt=d / "apiserver.crt",
        serving_key=d / "apiserver.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
    )
    try:
        _make_pki_cryptography(pki)
    except ImportError:
        _make_pki_openssl(pki, d)
    for key in (pki.ca_key, pki.serving_key, pki.sa_key):
        key.chmod(0o600)
    return pki


_SANS_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
_SANS_IP = ("127.0.0.1", SERVICE_IP_KUBERNETES)


def _make_pki_cryptography(pki: _Pki) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def pem_key(k: Any) -> bytes:
        return bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    later = now + _dt.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelfleet-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in _SANS_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _SANS_IP]
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki.ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.ca_key.write_bytes(pem_key(ca_key))
    pki.serving_crt.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    pki.serving_key.write_bytes(pem_key(srv_key))
    pki.sa_key.write_bytes(pem_key(sa_key))
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _make_pki_openssl(pki: _Pki, d: Path) -> None:
    openssl = shutil.which("openssl")
    if not openssl:
        raise ControlPlaneError("neither the `cryptography` package nor the `openssl` CLI is available")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki.ca_key))
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        str(pki.ca_key),
        "-subj",
        "/CN=modelfleet-test-ca",
        "-days",
        "3650",
        "-out",
        str(pki.ca_crt),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
    )
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki.serving_key))
    csr = d / "apiserver.csr"
    run("req", "-new", "-key", str(pki.serving_key), "-subj", "/CN=kube-apiserver", "-out", str(csr))
    ext = d / "apiserver.ext"
    alt = ",".join([f"DNS:{n}" for n in _SANS_DNS] + [f"IP:{ip}" for ip in _SANS_IP])
    ext.write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca_crt),
        "-CAkey",
        str(pki.ca_key),
        "-CAcreateserial",
        "-days",
        "3650",
        "-out",
        str(pki.serving_crt),
        "-extfile",
        str(ext),
    )
    run("genrsa", "-out", str(pki.sa_key), "2048")
    run("rsa", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))


# ------------------------------------------------------------------------ processes


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Kill the child if the Python process that started it dies (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


@dataclass
class _Proc:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]
    ports: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Token:
    token: str
    user: str
    uid: str
    groups: tuple[str, ...] = ()


class ControlPlane:
    """etcd + kube-apiserver (+ controller-manager, scheduler, kwok) on loopback.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.

    The temp dir is removed by :meth:`stop` unless ``keep_workdir`` (or env
    ``MODELFLEET_K8S_KEEP=1``) is set.

    Attributes available after :meth:`start`: ``server`` (``https://127.0.0.1:<port>``),
    ``token`` (admin bearer token, group ``system:masters``), ``ca_path``
    (CA bundle of the API server certificate), ``kubeconfig`` (admin kubeconfig
    path), ``workdir`` (temp dir with certs, kubeconfigs and ``logs/``).
    """

    def __init__(
        self,
        *,
        controller_manager: bool = False,
        scheduler: bool = False,
        kwok: bool = False,
        bin_dir: str | os.PathLike[str] | None = None,
        version: str = DEFAULT_K8S_VERSION,
        workdir: str | os.PathLike[str] | None = None,
        keep_workdir: bool | None = None,
        startup_timeout: float = 90.0,
        extra_apiserver_args: Sequence[str] = (),
        extra_controller_manager_args: Sequence[str] = (),
        extra_users: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir is not None else binary_dir(version)
        self.version = version
        self.with_controller_manager = controller_manager
        self.with_scheduler = scheduler
        self.with_kwok = kwok
        self.startup_timeout = startup_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_controller_manager_args = list(extra_controller_manager_args)
        # user -> groups: static bearer tokens the API server accepts (a real
        # kubelet is "system:node:<name>" in "system:nodes"); see token_for()
        self.extra_users = {u: tuple(g) for u, g in (extra_users or {}).items()}
        self._given_workdir = Path(workdir) if workdir is not None else None
        if keep_workdir is None:
            keep_workdir = os.environ.get("MODELFLEET_K8S_KEEP", "") not in ("", "0", "false")
        self.keep_workdir = keep_workdir
        self._procs: list[_Proc] = []
        self._tokens: dict[str, _Token] = {}
        self._started = False
        self.workdir: Path = Path()
        self.server = ""
        self.token = ""
        self.ca_path: Path = Path()
        self.kubeconfig: Path = Path()
        self.etcd_url = ""

    # ----------------------------------------------------------------- lifecycle

    def required_binaries(self) -> list[str]:
        names = ["etcd", "kube-apiserver", "kubectl"]
        if self.with_controller_manager:
            names.append("kube-controller-manager")
        if self.with_scheduler:
            names.append("kube-scheduler")
        if self.with_kwok:
            names.append("kwok")
        return names

    def _check_binaries(self) -> None:
        missing = [n for n in self.required_binaries() if not os.access(self.bin_dir / n, os.X_OK)]
        if missing:
            raise MissingBinariesError(
                f"missing Kubernetes test binaries {missing} in {self.bin_dir}; {_INSTALL_HINT} "
                "or point MODELFLEET_K8S_BIN at a directory that has them"
            )
        self._check_versions()
        if self.with_kwok and not any(_kwok_stages_dir(self.bin_dir).glob("*.yaml")):
            raise MissingBinariesError(
                f"kwok stage files missing in {_kwok_stages_dir(self.bin_dir)}; {_INSTALL_HINT} "
                "or set MODELFLEET_KWOK_STAGES"
            )

    def _check_versions(self) -> None:
        """Each binary reports the version the install script pins (the first line of ``--version``)."""
        expected = {"kube-apiserver": f"Kubernetes {self.version}", "etcd": f"etcd Version: {ETCD_VERSION[1:]}"}
        if self.with_kwok:
            expected["kwok"] = f"kwok version {KWOK_VERSION} "
        for name, want in expected.items():
            out = subprocess.run([self.bin(name), "--version"], capture_output=True, text=True, timeout=30)
            got = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
            if not got.startswith(want):
                raise MissingBinariesError(
                    f"{self.bin(name)} reports {got!r}, expected {want.strip()!r}; {_INSTALL_HINT} for the pinned versions"
                )

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.dump_logs()
        self.stop()

    def start(self) -> ControlPlane:
        if self._started:
            return self
        self._check_binaries()
        if self._given_workdir is not None:
            self.workdir = self._given_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="modelfleet-k8s-"))
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._started = True
        try:
            self._start_etcd()
            self._start_apiserver()
            if self.with_controller_manager:
                self._start_controller_manager()
            if self.with_scheduler:
                self._start_scheduler()
            if self.with_kwok:
                self._start_kwok()
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process in reverse start order: SIGTERM, SIGKILL after ``timeout``.

        One at a time: kube-apiserver takes ~15 s to exit when etcd is gone
        first, but ~1 s while etcd still answers.
        """
        procs, self._procs = list(reversed(self._procs)), []
        for p in procs:
            self._signal(p, signal.SIGTERM)
            try:
                p.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.popen.wait(timeout=10)
            # the process group may still hold children
            self._signal(p, signal.SIGKILL)
            p.log_file.close()
        # wait until no listener is left on the ports
        ports = [port for p in procs for port in p.ports]
        end = time.monotonic() + 10
        while any(port_is_listening(port) for port in ports) and time.monotonic() < end:
            time.sleep(0.1)
        if self._started and self._given_workdir is None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._started = False

    def restart_apiserver(self, down_s: float = 0.0) -> float:
        """Stop kube-apiserver (SIGTERM), leave it down ``down_s`` seconds, start it again on the same port
        with the same certificates and tokens, so every client keeps its kubeconfig (the fault suite's
        API server restart). Returns the seconds it was unreachable."""
        (old,) = [p for p in self._procs if p.name == "kube-apiserver"]
        self._signal(old, signal.SIGTERM)
        try:
            old.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(old, signal.SIGKILL)
            old.popen.wait(timeout=10)
        down = time.monotonic()
        old.log_file.close()
        self._procs.remove(old)
        end = time.monotonic() + 10
        while any(port_is_listening(port) for port in old.ports) and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(down_s)
        proc = self._spawn("kube-apiserver", old.args, old.ports)
        self._wait(proc, "/readyz after a restart", lambda: self._https_ok(f"{self.server}/readyz", self.token))
        return time.monotonic() - down

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs}

    @property
    def ports(self) -> dict[str, list[int]]:
        return {p.name: list(p.ports) for p in self._procs}

    @staticmethod
    def _signal(p: _Proc, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, sig)

    # ------------------------------------------------------------------- logs

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def dump_logs(self, tail_lines: int = 80, file: IO[str] | None = None) -> str:
        """Print (and return) the last ``tail_lines`` of every process log."""
        out: list[str] = []
        for log in sorted(self.log_dir.glob("*.log")) if self.workdir != Path() else []:
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            out.append(f"===== {log.name} (last {min(tail_lines, len(lines))} of {len(lines)} lines) =====")
            out.extend(lines[-tail_lines:])
        text = "\n".join(out)
        print(text, file=file or sys.stderr)
        return text

    # ---------------------------------------------------------------- helpers

    def _spawn(self, name: str, args: list[str], ports: Sequence[int] = ()) -> _Proc:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        log_file.write(f"$ {' '.join(args)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_set_pdeathsig,
        )
        proc = _Proc(name, args, log_path, popen, log_file, list(ports))
        self._procs.append(proc)
        return proc

    def _wait(self, proc: _Proc, what: str, check: Any, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        last_err: object = None
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ControlPlaneError(
                    f"{proc.name} exited with code {proc.popen.returncode} before {what}; see {proc.log_path}"
                )
            try:
                if check():
                    return
            except Exception as e:
                last_err = e
            time.sleep(0.25)
        raise ControlPlaneError(
            f"{proc.name}: timed out after {timeout or self.startup_timeout:.0f}s waiting for {what} "
            f"(last error: {last_err}); see {proc.log_path}"
        )

    def _https_ok(self, url: str, token: str | None = None, verify: bool = True) -> bool:
        # controller-manager and scheduler serve self-signed certs: verify=False
        ctx = ssl.create_default_context(cafile=str(self.ca_path)) if verify else ssl._create_unverified_context()
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError:
            return False

    def _new_token(self, user: str, groups: Sequence[str] = ()) -> _Token:
        t = _Token(secrets.token_hex(24), user, f"uid-{user}", tuple(groups))
        self._tokens[user] = t
        return t

    def _component_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        tok = self._tokens.get(user) or self._new_token(user, groups)
        return self.write_kubeconfig_for_token(
            self.workdir / "kubeconfigs" / f"{user.replace(':', '-')}.kubeconfig", tok.token, user=user
        )

    # ------------------------------------------------------------- components

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        args = [
            self.bin("etcd"),
            "--name=modelfleet-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=modelfleet-test=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        proc = self._spawn("etcd", args, [client, peer])

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=3) as r:
                return bool(json.loads(r.read()).get("health") == "true")

        self._wait(proc, "etcd /health", healthy)

    def _start_apiserver(self) -> None:
        pki = _make_pki(self.workdir / "pki")
        self.pki = pki
        self.ca_path = pki.ca_crt
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        admin = self._new_token("admin", ["system:masters"])
        self.token = admin.token
        self._new_token("system:kube-controller-manager")
        self._new_token("system:kube-scheduler")
        self._new_token("kwok", ["system:masters"])
        for user, groups in self.extra_users.items():
            self._new_token(user, groups)
        tokens_csv = self.workdir / "tokens.csv"
        rows = []
        for t in self._tokens.values():
            row = f"{t.token},{t.user},{t.uid}"
            if t.groups:
                row += ',"' + ",".join(t.groups) + '"'
            rows.append(row)
        tokens_csv.write_text("\n".join(rows) + "\n")
        tokens_csv.chmod(0o600)
        args = [
            self.bin("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_crt}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            f"--token-auth-file={tokens_csv}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
            *self.extra_apiserver_args,
        ]
        proc = self._spawn("kube-apiserver", args, [port])
        self._wait(proc, "/readyz", lambda: self._https_ok(f"{self.server}/readyz", self.token))
        self.kubeconfig = self.write_kubeconfig_for_token(
            self.workdir / "kubeconfigs" / "admin.kubeconfig", self.token, user="admin"
        )

    def _start_controller_manager(self) -> None:
        kc = self._component_kubeconfig("system:kube-controller-manager")
        port = free_port()
        args = [
            self.bin("kube-controller-manager"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_crt}",
            f"--cluster-signing-cert-file={self.pki.ca_crt}",
            f"--cluster-signing-key-file={self.pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # all on-by-default controllers (v1.37 has no cloud controllers in KCM)
            "--controllers=*",
            "--v=1",
            *self.extra_controller_manager_args,
        ]
        proc = self._spawn("kube-controller-manager", args, [port])
        self._wait(proc, "/healthz", lambda: self._https_ok(f"https://127.0.0.1:{port}/healthz", verify=False))

    def _start_scheduler(self) -> None:
        kc = self._component_kubeconfig("system:kube-scheduler")
        port = free_port()
        args = [
            self.bin("kube-scheduler"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--v=1",
        ]
        proc = self._spawn("kube-scheduler", args, [port])
        self._wait(proc, "/healthz", lambda: self._https_ok(f"https://127.0.0.1:{port}/healthz", verify=False))

    def _start_kwok(self) -> None:
        kc = self._component_kubeconfig("kwok", ["system:masters"])
        stages = sorted(_kwok_stages_dir(self.bin_dir).glob("*.yaml"))
        config = self.workdir / "kwok.yaml"
        # only Stage documents: kwok then builds a defaulted KwokConfiguration
        config.write_text("\n---\n".join(s.read_text().strip() for s in stages) + "\n")
        port = free_port()
        key, value = KWOK_NODE_ANNOTATION
        args = [
            self.bin("kwok"),
            f"--kubeconfig={kc}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.0.1.1",
            f"--server-address=127.0.0.1:{port}",
        ]
        proc = self._spawn("kwok", args, [port])
        self._wait(proc, "/healthz", lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"))

    # --------------------------------------------------------------- clients

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG`` and the binary dir first on ``PATH``."""
        e = dict(os.environ)
        e["KUBECONFIG"] = str(self.kubeconfig)
        e["PATH"] = f"{self.bin_dir}{os.pathsep}{e.get('PATH', '')}"
        return e

    def kubectl(
        self,
        *args: str,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 60.0,
        kubeconfig: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <admin> ARGS``; raises with stderr if ``check``."""
        cmd = [self.bin("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        data = input.decode() if isinstance(input, bytes) else input
        res = subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise ControlPlaneError(f"`kubectl {' '.join(args)}` failed ({res.returncode}):\n{res.stderr}{res.stdout}")
        return res

    def apply(self, *manifests: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
        """``kubectl apply`` the given manifests (dicts)."""
        doc = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
        return self.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def write_kubeconfig_for_token(
        self,
        path: str | os.PathLike[str],
        token: str,
        *,
        user: str = "user",
        namespace: str | None = None,
        server: str | None = None,
        tls_server_name: str | None = None,
    ) -> Path:
        """Kubeconfig for this API server authenticating with ``token``.

        ``server``/``tls_server_name``: reach it at another address (a port forwarded into a
        network namespace) while still verifying its certificate.
        """
        return write_kubeconfig(
            path,
            server or self.server,
            self.ca_path.read_bytes(),
            token,
            user=user,
            namespace=namespace,
            tls_server_name=tls_server_name,
        )

    def token_for(self, user: str) -> str:
        """The static bearer token of ``user`` (one of ``extra_users``, or a component)."""
        try:
            return self._tokens[user].token
        except KeyError:
            raise ControlPlaneError(f"no static token for {user!r}: pass it in extra_users=") from None

    def create_token(self, service_account: str, namespace: str = "default", duration: str = "1h") -> str:
        """A bound ServiceAccount token (TokenRequest API via ``kubectl create token``)."""
        res = self.kubectl("create", "token", service_account, "-n", namespace, f"--duration={duration}")
        return res.stdout.strip()

    def write_serviceaccount_dir(self, path: str | os.PathLike[str], token: str, namespace: str = "default") -> Path:
        """Mimic ``/var/run/secrets/kubernetes.io/serviceaccount`` (token, ca.crt, namespace).

        Pair it with :meth:`in_cluster_env` to run a process "in-cluster style".
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        (d / "token").write_text(token)
        (d / "ca.crt").write_bytes(self.ca_path.read_bytes())
        (d / "namespace").write_text(namespace)
        return d

    def in_cluster_env(self) -> dict[str, str]:
        """``KUBERNETES_SERVICE_HOST``/``PORT`` pointing at this API server."""
        host, _, port = self.server.removeprefix("https://").rpartition(":")
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}

    def wait_for(self, what: str, predicate: Any, timeout: float = 60.0, interval: float = 0.5) -> Any:
        """Poll ``predicate()`` until truthy (returned); on timeout dump logs and raise."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if result:
                    return result
                last = result
            except Exception as e:
                last = e
            time.sleep(interval)
        self.dump_logs()
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:
        return bool(r.status == 200)
