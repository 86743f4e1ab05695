"""Cluster mode: the sidecar's peers are the endpoints of its deployment's headless Service.

Every ``interval_s`` the sidecar lists the EndpointSlices labelled
``kubernetes.io/service-name=<service>`` in its namespace (the same
list-and-replace approach as the gateway's ``discovery.py``, with the official
client in a worker thread) and hands ``Coordinator.set_peers`` one URL,
``http://<address>:<port>``, per endpoint that may take traffic:

- ``conditions.ready`` false: left out. Unset counts as ready, as the API
  documents. The operator's headless Service publishes not-ready addresses, so
  a pod whose engine is still loading is listed as ready and the sidecar's own
  /readyz checks decide when it gets requests (a loading engine answers 503).
- ``conditions.terminating`` true: left out, whatever ``ready`` says (with
  ``publishNotReadyAddresses`` a terminating pod's endpoint stays ready).
- The port is the slice's port named ``port_name`` (the Service's ``engine``
  port, resolved per pod), else ``default_port``; a slice with neither is
  skipped with a warning.

The sidecar's own engine is not preferred: it is one peer among the others,
reached at its pod IP, and every sidecar of a deployment sees the same sorted
list, so the hash rings of PrefixAffinity and SessionAffinity agree between
sidecars and ``peer_index`` means the same replica in each sidecar's metrics.

A failed list (API server unreachable, RBAC denied, timeout) keeps the last
known peers and logs a warning; so does a list with no usable endpoint (the
sidecar's own pod is always in it, with ``publishNotReadyAddresses``, so an
empty answer is a lagging or misconfigured view, not "no replicas"). Until the
first useful list the sidecar routes to the ``--peer`` URLs it was started
with (the operator passes the pod's own engine on loopback).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from modelfleet.dataplane.sidecar.service import Coordinator

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
WARN_EVERY_S = 60.0  # a persistent failure is logged again at most this often


def _slice_port(slice_: Mapping[str, Any], port_name: str, default_port: int | None) -> int | None:
    for port in slice_.get("ports") or []:
        if (port.get("name") or "") == port_name and isinstance(port.get("port"), int):
            return int(port["port"])
    return default_port


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address  # IPv6
    return f"http://{host}:{port}"


def endpoint_takes_traffic(endpoint: Mapping[str, Any]) -> bool:
    """Ready (unset counts as ready) and not terminating."""
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def peers_from_slices(
    slices: Iterable[Mapping[str, Any]], port_name: str = "engine", default_port: int | None = None
) -> list[str]:
    """Peer URLs of every ready, non-terminating endpoint in ``slices`` (EndpointSlice dicts as the API
    returns them), deduplicated and sorted so that every sidecar derives the same list."""
    urls: set[str] = set()
    for slice_ in slices:
        port = _slice_port(slice_, port_name, default_port)
        name = (slice_.get("metadata") or {}).get("name", "?")
        if port is None:
            if not any(endpoint_takes_traffic(e) for e in slice_.get("endpoints") or []):
                continue  # e.g. the controller's placeholder slice of a Service with no pods: no ports either
            log.warning(
                "EndpointSlice %s has no port named %r and no --engine-port was given; skipped", name, port_name
            )
            continue
        for endpoint in slice_.get("endpoints") or []:
            if endpoint_takes_traffic(endpoint):
                urls.update(_url(address, port) for address in endpoint.get("addresses") or [])
    return sorted(urls)


def _describe(exc: BaseException) -> str:
    """One line: an ApiException's str() carries every response header and the body."""
    status = getattr(exc, "status", None)
    if status is not None:
        return f"{type(exc).__name__}: {status} {getattr(exc, 'reason', '')}".rstrip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def default_namespace() -> str:
    """The pod's namespace from its ServiceAccount mount, else ``default`` (as kubectl does)."""
    try:
        return NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def endpoint_slice_lister(service: str, namespace: str) -> Callable[[], list[Mapping[str, Any]]]:
    """A blocking function that lists the Service's EndpointSlices (in-cluster config, else kubeconfig)."""
    import json

    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    api = client.DiscoveryV1Api()
    selector = f"{SERVICE_NAME_LABEL}={service}"

    def list_slices() -> list[Mapping[str, Any]]:
        resp: Any = api.list_namespaced_endpoint_slice(  # the raw response: dicts as the API spells them
            namespace, label_selector=selector, _preload_content=False, _request_timeout=10
        )
        items: list[Mapping[str, Any]] = json.loads(resp.data)["items"]
        return items

    return list_slices


class PeerDiscovery:
    """Keeps a Coordinator's peers equal to the ready endpoints of a Service."""

    def __init__(
        self,
        coordinator: Coordinator,
        lister: Callable[[], list[Mapping[str, Any]]],
        *,
        service: str,
        port_name: str = "engine",
        default_port: int | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.coordinator = coordinator
        self.lister = lister
        self.service = service
        self.port_name = port_name
        self.default_port = default_port
        self.interval_s = interval_s
        self._failing_since: float | None = None
        self._last_warning = 0.0
        self._last_text = ""

    def _warn(self, message: str, *args: object) -> None:
        """Logs a failure when it starts, when it changes, and once a minute while it lasts."""
        now = time.monotonic()
        text = message % args
        if self._failing_since is None:
            self._failing_since = now
        if text != self._last_text or now - self._last_warning >= WARN_EVERY_S:
            self._last_warning, self._last_text = now, text
            known = [p.url for p in self.coordinator.peers]
            log.warning("%s; keeping the %d known peers %s", text, len(known), known)

    async def refresh(self) -> bool:
        """One list; returns True when the peer set changed."""
        try:
            slices = await asyncio.to_thread(self.lister)
        except Exception as exc:  # keep the last known peers: the API server may be restarting
            self._warn("listing the EndpointSlices of %s failed (%s)", self.service, _describe(exc))
            return False
        urls = peers_from_slices(slices, self.port_name, self.default_port)
        if not urls:
            self._warn("Service %s has no ready endpoint", self.service)
            return False
        if self._failing_since is not None:
            log.info("EndpointSlices of %s give peers again", self.service)
            self._failing_since, self._last_text = None, ""
        if urls == [p.url for p in self.coordinator.peers]:
            return False
        log.info("peers of %s: %s", self.service, urls)
        self.coordinator.set_peers(urls)
        if self.coordinator.session is not None:
            await self.coordinator.check_all()  # new peers start not ready: check them now, not next round
        return True

    async def run_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)
