"""A REAL Kubernetes node for ModelFleet's e2e tests: containerd + runc + CNI bridge + kubelet (+ kube-proxy).

kwok nodes only pretend to run containers; a :class:`RealNode` runs them. It joins a
:class:`e2e.cluster.ControlPlane` and is started and torn down by the harness like the
control plane itself. What it needs comes from ``scripts/node-install.sh`` (kubelet and
kube-proxy next to the control-plane binaries, Debian's containerd/runc/CNI plugins,
and the pause and busybox images built on this machine).

Isolation, so that a test can never touch anything but its own hosts:

* network: the node lives in a network namespace the harness creates (``mfnode-<pid>-<n>``)
  with no default route. A veth pair links it to the host: the host end carries a /30
  address on which a small TCP forwarder in this process relays the API server (which
  itself listens on loopback only); the node end is the node IP the API server dials for
  ``kubectl logs``/``exec``. The CNI bridge does not masquerade, so a pod reaches only the
  node, other pods, and (through the ``kubernetes`` Service) the API server. The host gets
  one route (pod CIDR via the node end of the veth), which disappears with the veth.
* mounts: containerd, kubelet and kube-proxy share one private mount namespace (held by a
  ``sleep`` process); overlay and volume mounts made there vanish with it. Fixed host paths
  the components insist on (``/run/containerd``, ``/var/lib/cni``, ``/var/log/containers``)
  are tmpfs inside it. Three kernel settings kubelet would otherwise rewrite for the whole
  machine (``vm.overcommit_memory``, ``kernel.panic``, ``kernel.panic_on_oops``) read as
  kubelet wants them inside that namespace only, and ``protectKernelDefaults`` makes
  kubelet fail rather than ever write them.
* cgroups: every pod lives under a cgroup root of its own (``/mfnode-<pid>-<n>``, cgroup v1
  and v2 alike), removed on teardown.

Needs root and Linux. Example::

    cp = ControlPlane(
        controller_manager=True, scheduler=True,
        extra_users=node_users("mf-node-0"), extra_apiserver_args=NODE_APISERVER_ARGS,
    )
    with cp, RealNode(cp, "mf-node-0") as node:
        node.wait_ready()
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from e2e.cluster import (
    SERVICE_CLUSTER_IP_RANGE,
    ControlPlane,
    ControlPlaneError,
    MissingBinariesError,
    _set_pdeathsig,
)

__all__ = [
    "NODE_APISERVER_ARGS",
    "NODE_TAINT",
    "NodeError",
    "RealNode",
    "modelfleet_images",
    "node_cache_dir",
    "node_images",
    "node_users",
]

#: The real node registers with this taint, so only pods meant for it land there
#: (the session's kwok tests schedule ordinary pods too).
NODE_TAINT = {"key": "modelfleet.io/real-node", "value": "true", "effect": "NoSchedule"}
NODE_TOLERATION = {"key": NODE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}

_INSTALL_HINT = "run `scripts/node-install.sh` (as root) after `scripts/k8s-install.sh`"
_LINK_NET = ipaddress.IPv4Network("10.252.0.0/16")  # /30 links host <-> node
_POD_NETS = ipaddress.IPv4Network("10.246.0.0/16")  # one /24 per node
_HOST_DIRS = ("/run/containerd", "/var/lib/cni", "/var/log/containers")
# kubelet sets these machine-wide sysctls unless they already read like this
_KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}


class NodeError(ControlPlaneError):
    """The real node could not start, or failed a check."""


#: API server flags a real node needs: dial kubelets by their InternalIP (the node's Hostname
#: address is its name, which nothing resolves).
NODE_APISERVER_ARGS = ("--kubelet-preferred-address-types=InternalIP",)


def node_users(name: str) -> dict[str, tuple[str, ...]]:
    """The static users a node named ``name`` needs: pass to ``ControlPlane(extra_users=...)``."""
    return {f"system:node:{name}": ("system:nodes",), "system:kube-proxy": ()}


def node_control_plane(name: str) -> ControlPlane:
    """A control plane (API server, controller-manager, scheduler) that a real node ``name`` can join."""
    return ControlPlane(
        controller_manager=True,
        scheduler=True,
        extra_users=node_users(name),
        extra_apiserver_args=NODE_APISERVER_ARGS,
    )


def node_cache_dir() -> Path:
    cache = Path(os.environ.get("MODELFLEET_CACHE") or Path.home() / ".cache" / "modelfleet")
    return cache.expanduser() / "node"


@dataclass(frozen=True)
class Image:
    role: str
    ref: str
    archive: Path
    digest: str  # manifest digest, sha256:...
    image_id: str  # config digest: what kubelet reports as a container's imageID


def _read_images(index: Path, hint: str) -> dict[str, Image]:
    if not index.is_file():
        raise MissingBinariesError(f"{index} is missing; {hint}")
    out = {}
    for line in index.read_text().splitlines():
        role, ref, archive, digest, image_id = line.split()
        out[role] = Image(role, ref, Path(archive), digest, image_id)
    return out


def node_images() -> dict[str, Image]:
    """The images ``scripts/node-install.sh`` built (``images.txt``), by role (pause, busybox)."""
    return _read_images(node_cache_dir() / "images" / "images.txt", _INSTALL_HINT)


def modelfleet_images() -> dict[str, Image]:
    """ModelFleet's own images that ``scripts/images.sh`` built from docker/, by name (modelfleet, ...)."""
    return _read_images(node_cache_dir().parent / "images" / "images.txt", "run `scripts/images.sh` (as root)")


# --------------------------------------------------------------------- forwarder


class _TcpForwarder:
    """Relay ``listen`` -> ``target`` (the API server on loopback) for clients in the node's netns."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self._srv = socket.create_server(listen, reuse_port=False)
        self._srv.settimeout(0.5)
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"node-fwd-{listen}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            conn.settimeout(None)
            with self._lock:
                self._socks.update((conn, up))
            threading.Thread(target=self._relay, args=(conn, up), daemon=True).start()

    def _relay(self, conn: socket.socket, up: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(up, conn), daemon=True)
        back.start()
        self._pump(conn, up)
        back.join()
        with self._lock:
            self._socks.difference_update((conn, up))
        conn.close()
        up.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------ helpers


def _run(
    *args: str, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise NodeError(f"`{' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}{res.stdout.strip()}")
    return res


def _cgroup_mounts() -> list[Path]:
    """Every cgroup (v1 controller, named v1, and v2) mount point of this machine."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, mnt, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(mnt))
    return out


def cgroup_version() -> int:
    """2 when /sys/fs/cgroup is the unified hierarchy, else 1 (possibly hybrid)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, mnt, fstype, *_ = line.split()
        if mnt == "/sys/fs/cgroup":
            return 2 if fstype == "cgroup2" else 1
    return 1


def _used_ipv4_nets() -> list[ipaddress.IPv4Network]:
    res = _run("ip", "-4", "-o", "route", "show", "table", "all", check=False)
    nets = []
    for line in res.stdout.splitlines():
        dst = line.split()[0]
        if dst in ("default", "broadcast", "local", "unreachable", "multicast"):
            dst = line.split()[1] if len(line.split()) > 1 else ""
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(dst, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network) and n.prefixlen > 0]


def _free_subnet(
    pool: ipaddress.IPv4Network, prefix: int, seed: int, used: list[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    subnets = list(pool.subnets(new_prefix=prefix))
    for i in range(len(subnets)):
        cand = subnets[(seed + i) % len(subnets)]
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise NodeError(f"no free /{prefix} left in {pool}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_shims_matching(fragment: bytes) -> None:
    """SIGKILL containerd-shim-runc-v2 processes whose command line mentions ``fragment``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and any(fragment in part for part in cmd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _remove_cgroup_tree(root: Path, timeout: float = 10) -> bool:
    """SIGKILL what runs in ``root`` and below, then rmdir it bottom-up; True when gone."""
    deadline = time.monotonic() + timeout
    while root.exists() and time.monotonic() < deadline:
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()
        if root.exists():
            time.sleep(0.2)
    return not root.exists()


def cleanup_stale() -> list[str]:
    """Remove what a killed test run left behind: ``mfnode-<pid>-<n>`` netns, veths, cgroups and
    shims whose pid is dead. Returns the names it removed."""
    removed = []
    names = {line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line}
    for mnt in _cgroup_mounts():
        with contextlib.suppress(OSError):
            names.update(p.name for p in mnt.iterdir() if p.is_dir())
    for name in sorted(names):
        m = re.fullmatch(r"mfnode-(\d+)-(\d+)", name)
        if not m or _pid_alive(int(m[1])):
            continue
        _kill_shims_matching(f"/{name}-".encode())
        for mnt in _cgroup_mounts():
            _remove_cgroup_tree(mnt / name)
        _run("ip", "link", "del", f"mfh{m[1]}x{m[2]}"[:15], check=False)
        _run("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


_counter = 0


class RealNode:
    """One real kubelet node in its own network namespace, joined to ``cp``.

    ``cp`` must have been created with ``extra_users=node_users(name)`` (the kubelet and
    kube-proxy authenticate with static tokens). Attributes after :meth:`start`:
    ``netns``, ``node_ip``, ``host_ip``, ``pod_cidr``, ``workdir``, ``images``.
    """

    def __init__(
        self,
        cp: ControlPlane,
        name: str = "mf-node-0",
        *,
        kube_proxy: bool = True,
        startup_timeout: float = 120.0,
        keep_workdir: bool | None = None,
        extra_images: Sequence[str | os.PathLike[str]] = (),
        taint: bool = True,
    ) -> None:
        """``extra_images``: more OCI/docker image archives to import (e.g. ModelFleet's own images).
        ``taint``: register with :data:`NODE_TAINT` (keep it when kwok nodes share the cluster)."""
        global _counter
        _counter += 1
        self.cp = cp
        self.name = name
        self.with_kube_proxy = kube_proxy
        self.extra_images = [Path(p) for p in extra_images]
        self.taint = taint
        self.startup_timeout = startup_timeout
        if keep_workdir is None:
            keep_workdir = os.environ.get("MODELFLEET_K8S_KEEP", "") not in ("", "0", "false")
        self.keep_workdir = keep_workdir
        self.id = f"mfnode-{os.getpid()}-{_counter}"
        self.netns = self.id
        self.host_veth = f"mfh{os.getpid()}x{_counter}"[:15]
        self.cgroup_name = self.id
        self.workdir = Path()
        self.images: dict[str, Image] = {}
        self.node_ip = self.host_ip = ""
        self.pod_cidr = ipaddress.IPv4Network("0.0.0.0/32")
        self._procs: list[_Proc] = []
        self._holder: subprocess.Popen[bytes] | None = None
        self._forwarder: _TcpForwarder | None = None
        self._created_dirs: list[Path] = []
        self._created_cgroups: list[Path] = []
        self._started = False
        self.import_s: dict[str, float] = {}

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.dump_logs()
        self.stop()

    def bin(self, name: str) -> str:
        """kubelet/kube-proxy from the control plane's bin dir; the rest from PATH (Debian)."""
        p = self.cp.bin_dir / name
        if p.exists():
            return str(p)
        found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if not found:
            raise MissingBinariesError(f"{name} not found; {_INSTALL_HINT}")
        return found

    def _check_prerequisites(self) -> None:
        if not sys.platform.startswith("linux"):
            raise NodeError("a real node needs Linux")
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (network namespaces, mounts, cgroups)")
        missing = [n for n in ("kubelet", "kube-proxy") if not os.access(self.cp.bin_dir / n, os.X_OK)]
        missing += [
            n
            for n in ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "iptables", "ip", "nsenter")
            if not shutil.which(n, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        ]
        missing += [
            f"/usr/lib/cni/{p}" for p in ("bridge", "host-local", "loopback") if not Path(f"/usr/lib/cni/{p}").exists()
        ]
        if missing:
            raise MissingBinariesError(f"missing for the real node: {missing}; {_INSTALL_HINT}")
        self.images = node_images()
        for img in self.images.values():
            if not img.archive.is_file():
                raise MissingBinariesError(f"image archive {img.archive} is missing; {_INSTALL_HINT}")
        if f"system:node:{self.name}" not in self.cp.extra_users:
            raise NodeError(f"create the ControlPlane with extra_users=node_users({self.name!r})")

    def start(self) -> RealNode:
        if self._started:
            return self
        self._check_prerequisites()
        cleanup_stale()
        self._started = True
        t0 = time.monotonic()
        try:
            self.workdir = Path(
                tempfile.mkdtemp(prefix=f"{self.id}-", dir=self.cp.workdir if self.cp.workdir != Path() else None)
            )
            self._setup_network()
            self._setup_cgroups()
            self._write_configs()
            self._start_holder()
            self._start_containerd()
            self._import_images()
            self._start_kubelet()
            if self.with_kube_proxy:
                self._start_kube_proxy()
            self.wait_ready(timeout=self.startup_timeout)
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop every process, remove netns, veth, cgroups, host dirs it made, and the workdir."""
        if not self._started:
            return
        by_name = {p.name: p for p in self._procs}
        for name in ("kube-proxy", "kubelet"):
            if name in by_name:
                self._terminate(by_name[name])
        self._kill_cgroup_tree()
        if "containerd" in by_name:
            self._terminate(by_name["containerd"])
        self._kill_shims()
        self._kill_cgroup_tree()
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._holder.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(timeout=10)
            self._holder = None
        for p in self._procs:
            p.log_file.close()
        self._procs = []
        self._remove_cgroups()
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None
        _run("ip", "link", "del", self.host_veth, check=False)
        _run("ip", "netns", "del", self.netns, check=False)
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created_dirs = []
        if self.workdir != Path() and not self.keep_workdir:
            self._discard_workdir()
        self._started = False

    def _discard_workdir(self) -> None:
        """Remove the workdir without waiting: an unpacked image is ~15k files, 20-30 s of unlink
        here. Moved out of the control plane's dir (which ``cp.stop()`` removes synchronously),
        then deleted by a niced ``rm`` that outlives the test if it must."""
        trash = Path(tempfile.gettempdir()) / f"{self.workdir.name}.trash"
        try:
            os.rename(self.workdir, trash)
        except OSError:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        # the shell exits at once; its background rm is no child of ours (no ResourceWarning, no zombie)
        subprocess.run(
            ["sh", "-c", 'nice -n 15 rm -rf --one-file-system "$1" </dev/null >/dev/null 2>&1 &', "sh", str(trash)],
            check=False,
            timeout=10,
        )

    # ------------------------------------------------------------- network

    def _setup_network(self) -> None:
        used = _used_ipv4_nets()
        link = _free_subnet(_LINK_NET, 30, os.getpid() + _counter, used)
        self.pod_cidr = _free_subnet(_POD_NETS, 24, os.getpid() + _counter, [*used, link])
        hosts = list(link.hosts())
        self.host_ip, self.node_ip = str(hosts[0]), str(hosts[1])
        ns = self.netns
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.node_ip}/30", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        # replies to pods come back through the node; no default route anywhere in the netns
        _run("ip", "route", "add", str(self.pod_cidr), "via", self.node_ip, "dev", self.host_veth)
        # a client ON the node (not in a pod) needs a route to ClusterIPs before kube-proxy's OUTPUT
        # DNAT applies; one the DNAT misses ends at the host, which does not forward (ip_forward=0
        # checked below) -- so still nothing leaves the machine
        _run("ip", "-n", ns, "route", "add", SERVICE_CLUSTER_IP_RANGE, "dev", "eth0")
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1")):
            _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}", check=key == "net.ipv4.ip_forward")
        apiserver_port = int(self.cp.server.rsplit(":", 1)[1])
        self.apiserver_port = apiserver_port
        self._forwarder = _TcpForwarder((self.host_ip, apiserver_port), ("127.0.0.1", apiserver_port))
        self.apiserver_url = f"https://{self.host_ip}:{apiserver_port}"

    def outside_route_check(self, address: str = "1.1.1.1") -> str:
        """``ip route get`` for an outside address inside the node's netns (sends nothing): the error text."""
        res = _run("ip", "-n", self.netns, "route", "get", address, check=False)
        return (res.stderr or res.stdout).strip() if res.returncode != 0 else ""

    # ------------------------------------------------------------- cgroups

    def _setup_cgroups(self) -> None:
        for mnt in _cgroup_mounts():
            d = mnt / self.cgroup_name
            try:
                d.mkdir()
            except FileExistsError:
                pass
            except OSError:
                continue
            self._created_cgroups.append(d)
            # a fresh v1 cpuset has no cpus/mems: copy the parent's or no task may join
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (d / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((mnt / f).read_text())

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for d in self._created_cgroups:
            for procs in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        return pids

    def _kill_cgroup_tree(self) -> None:
        """SIGKILL every process in the node's cgroups (the pods' containers)."""
        deadline = time.monotonic() + 10
        while (pids := self._cgroup_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def _remove_cgroups(self) -> None:
        self._created_cgroups = [r for r in self._created_cgroups if not _remove_cgroup_tree(r)]

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 processes of THIS node's containerd (matched by its socket path)."""
        _kill_shims_matching(str(self.containerd_sock).encode())

    # ------------------------------------------------------------- configs

    @property
    def containerd_sock(self) -> Path:
        return self.workdir / "containerd.sock"

    def _write_configs(self) -> None:
        w = self.workdir
        for d in (
            "containerd/root",
            "containerd/state",
            "containerd/opt",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "volume-plugins",
            "sysctl",
        ):
            (w / d).mkdir(parents=True, exist_ok=True)
        pause = self.images["pause"].ref
        (w / "containerd.toml").write_text(
            "version = 2\n"
            f'root = "{w}/containerd/root"\n'
            f'state = "{w}/containerd/state"\n'
            'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
            ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]\n'
            "[grpc]\n"
            f'  address = "{self.containerd_sock}"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{w}/containerd/opt"\n'
            '[plugins."io.containerd.grpc.v1.cri"]\n'
            f'  sandbox_image = "{pause}"\n'
            "  netns_mounts_under_state_dir = true\n"
            # the machines here withhold CAP_SYS_RESOURCE even from root: no process may lower its
            # oom_score_adj, so clamp the pods' (kubelet asks -998 for sandboxes) at containerd's own
            "  restrict_oom_score_adj = true\n"
            '  [plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '    snapshotter = "overlayfs"\n'
            '    default_runtime_name = "runc"\n'
            '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '      runtime_type = "io.containerd.runc.v2"\n'
            '      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
            "        SystemdCgroup = false\n"
            '  [plugins."io.containerd.grpc.v1.cri".cni]\n'
            '    bin_dir = "/usr/lib/cni"\n'
            f'    conf_dir = "{w}/cni/net.d"\n'
        )
        cni = {
            "cniVersion": "1.0.0",
            "name": "mfnode",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,  # no NAT: nothing may leave the node's netns
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.pod_cidr)}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": f"{w}/cni/ipam",
                    },
                }
            ],
        }
        (w / "cni/net.d/10-mfnode.conflist").write_text(json.dumps(cni, indent=2))
        (w / "resolv.conf").write_text("# no DNS on the ModelFleet test node\noptions ndots:1\n")
        for key, value in _KUBELET_SYSCTLS.items():
            (w / "sysctl" / key.replace("/", "-")).write_text(value + "\n")
        kubelet_users = node_users(self.name)
        node_user, proxy_user = list(kubelet_users)
        self.cp.write_kubeconfig_for_token(
            w / "kubelet.kubeconfig",
            self.cp.token_for(node_user),
            user=node_user,
            server=self.apiserver_url,
            tls_server_name="kubernetes",
        )
        self.cp.write_kubeconfig_for_token(
            w / "kube-proxy.kubeconfig",
            self.cp.token_for(proxy_user),
            user=proxy_user,
            server=self.apiserver_url,
            tls_server_name="kubernetes",
        )
        kubelet_cfg: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            # only the host (the API server) can reach this address; it dials without a client cert
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_name}",
            "cgroupsPerQOS": True,
            "failCgroupV1": False,  # kubelet >= 1.35 refuses cgroup v1 hosts otherwise
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "failSwapOn": False,
            "oomScoreAdj": 0,  # see restrict_oom_score_adj: lowering it needs CAP_SYS_RESOURCE
            "protectKernelDefaults": True,
            "resolvConf": str(w / "resolv.conf"),
            "clusterDomain": "cluster.local",
            "podLogsDir": str(w / "pod-logs"),
            "volumePluginDir": str(w / "volume-plugins"),
            "registerWithTaints": [NODE_TAINT] if self.taint else [],
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 30,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "nodeStatusReportFrequency": "10s",
            "enforceNodeAllocatable": ["pods"],
        }
        (w / "kubelet.yaml").write_text(json.dumps(kubelet_cfg, indent=2))
        proxy_cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(w / "kube-proxy.kubeconfig")},
            "hostnameOverride": self.name,
            "bindAddress": self.node_ip,
            "clusterCIDR": str(self.pod_cidr),
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # leave the machine-wide conntrack settings alone
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
        }
        (w / "kube-proxy.yaml").write_text(json.dumps(proxy_cfg, indent=2))

    # ----------------------------------------------------------- processes

    def _start_holder(self) -> None:
        """A ``sleep`` holding the node's private mount namespace inside its netns."""
        w = self.workdir
        for d in _HOST_DIRS:
            p = Path(d)
            if not p.exists():
                p.mkdir(parents=True)
                self._created_dirs.append(p)
        lines = ["set -e"]
        lines += [f"mount -t tmpfs -o mode=0755 mfnode {d}" for d in _HOST_DIRS]
        lines += [f"mount --bind {w}/sysctl/{k.replace('/', '-')} /proc/sys/{k}" for k in _KUBELET_SYSCTLS]
        lines += [f"touch {w}/holder.ready", "exec sleep infinity"]
        log = open(self.cp.log_dir / f"node-{self.name}-holder.log", "ab")  # noqa: SIM115
        self._holder = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{self.netns}",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "sh",
                "-c",
                "\n".join(lines),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_set_pdeathsig,
        )
        log.close()
        deadline = time.monotonic() + 15
        while not (w / "holder.ready").exists():
            if self._holder.poll() is not None or time.monotonic() > deadline:
                raise NodeError(
                    f"the namespace holder failed (rc={self._holder.poll()}); see node-{self.name}-holder.log"
                )
            time.sleep(0.05)

    def _spawn(self, name: str, args: list[str]) -> _Proc:
        assert self._holder is not None
        log_path = self.cp.log_dir / f"node-{self.name}-{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = ["nsenter", f"--target={self._holder.pid}", "--mount", "--net", "--", *args]
        log_file.write(f"$ {' '.join(cmd)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_set_pdeathsig,
            env={**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        proc = _Proc(name, popen, log_path, log_file)
        self._procs.append(proc)
        return proc

    def _terminate(self, p: _Proc, timeout: float = 15) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.popen.pid, signal.SIGTERM)
        try:
            p.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.popen.pid, signal.SIGKILL)

    def _wait(self, proc: _Proc, what: str, check: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise NodeError(
                    f"{proc.name} exited with code {proc.popen.returncode} before {what}; see {proc.log_path}"
                )
            try:
                if check():
                    return
            except Exception as e:
                last = e
            time.sleep(0.25)
        raise NodeError(
            f"{proc.name}: timed out after {timeout:.0f}s waiting for {what} (last: {last}); see {proc.log_path}"
        )

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd (namespace k8s.io); runs on the host side of the socket."""
        return _run(
            "ctr", f"--address={self.containerd_sock}", "--namespace=k8s.io", *args, check=check, timeout=timeout
        )

    def _start_containerd(self) -> None:
        proc = self._spawn("containerd", ["containerd", f"--config={self.workdir}/containerd.toml", "--log-level=info"])
        self._wait(proc, "its socket", lambda: self.ctr("version", timeout=5).returncode == 0, timeout=30)

    def _import_images(self) -> None:
        for img in self.images.values():
            self.ctr("images", "import", str(img.archive), timeout=120)
        for archive in self.extra_images:
            t0 = time.monotonic()
            self.ctr("images", "import", str(archive), timeout=600)
            self.import_s[archive.name] = time.monotonic() - t0
        listed = self.ctr("images", "ls", "-q").stdout.split()
        missing = [i.ref for i in self.images.values() if i.ref not in listed]
        if missing:
            raise NodeError(f"images not in containerd after import: {missing} (have {listed})")

    def _start_kubelet(self) -> None:
        w = self.workdir
        proc = self._spawn(
            "kubelet",
            [
                self.bin("kubelet"),
                f"--config={w}/kubelet.yaml",
                f"--kubeconfig={w}/kubelet.kubeconfig",
                f"--root-dir={w}/kubelet",
                f"--cert-dir={w}/kubelet/pki",
                f"--hostname-override={self.name}",
                f"--node-ip={self.node_ip}",
                "--v=1",
            ],
        )
        self._wait(
            proc,
            "its Node object",
            lambda: self.cp.kubectl("get", "node", self.name, check=False).returncode == 0,
            timeout=self.startup_timeout,
        )

    def _start_kube_proxy(self) -> None:
        w = self.workdir
        self._spawn("kube-proxy", [self.bin("kube-proxy"), f"--config={w}/kube-proxy.yaml", "--v=1"])

    # -------------------------------------------------------------- status

    def node_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.cp.get_json("node", self.name)
        return obj

    def is_ready(self) -> bool:
        conds = self.node_object().get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def wait_ready(self, timeout: float = 120.0) -> None:
        (kubelet,) = [p for p in self._procs if p.name == "kubelet"]
        self._wait(kubelet, f"node {self.name} Ready", self.is_ready, timeout=timeout)

    def publish_apiserver_endpoint(self) -> None:
        """Point the ``kubernetes`` Service at the forwarder, so pods reach the API server at its ClusterIP.

        The test API server runs with ``--endpoint-reconciler-type=none`` and listens on loopback,
        so nothing else publishes an address a pod can reach.
        """
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"kubernetes-{self.name}",
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "modelfleet-e2e",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [self.host_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": self.apiserver_port, "protocol": "TCP"}],
        }
        self.cp.apply(slice_)

    def in_netns(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` on a thread that lives in the node's network namespace (setns is per thread):
        its sockets reach ClusterIPs and pod IPs as a client on the node would."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), f"setns into {self.netns}")
                finally:
                    os.close(fd)
                result["value"] = fn(*args, **kwargs)
            except BaseException as e:  # re-raised on the caller's thread
                result["error"] = e

        t = threading.Thread(target=target, name=f"in-{self.netns}")
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def dump_logs(self, tail_lines: int = 60) -> str:
        out = []
        for p in sorted(self.cp.log_dir.glob(f"node-{self.name}-*.log")) if self.cp.workdir != Path() else []:
            lines = p.read_text(errors="replace").splitlines()
            out.append(f"===== {p.name} (last {min(tail_lines, len(lines))} of {len(lines)} lines) =====")
            out.extend(lines[-tail_lines:])
        text = "\n".join(out)
        print(text, file=sys.stderr)
        return text


@contextlib.contextmanager
def cluster_with_real_node(name: str = "mf-node-0", **cp_kwargs: Any) -> Iterator[tuple[ControlPlane, RealNode]]:
    """A fresh control plane (controller-manager + scheduler) with one real node, torn down after."""
    cp_kwargs.setdefault("controller_manager", True)
    cp_kwargs.setdefault("scheduler", True)
    cp_kwargs.setdefault("extra_apiserver_args", NODE_APISERVER_ARGS)
    extra_images = cp_kwargs.pop("extra_images", ())
    cp = ControlPlane(extra_users=node_users(name), **cp_kwargs)
    cp.start()
    try:
        node = RealNode(cp, name, extra_images=extra_images)
        node.start()
        try:
            yield cp, node
        finally:
            node.stop()
    finally:
        cp.stop()
