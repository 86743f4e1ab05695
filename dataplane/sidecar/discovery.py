"""Cluster mode: the sidecar's peers are the endpoints of its deployment's headless Service.

The sidecar follows the EndpointSlices labelled
``kubernetes.io/service-name=<service>`` in its namespace (watched, with
polling as the fallback: see below) and hands ``Coordinator.set_peers`` one
URL, ``http://<address>:<port>``, per endpoint that may take traffic:

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

How the sidecar follows the slices: with a ``watcher`` (what the sidecar
process uses), one list, then a watch from that list's ``resourceVersion``
(the Kubernetes watch API over aiohttp, streamed: ADDED / MODIFIED / DELETED
events update the slices, bookmarks only the version). A watch the API server
ends (``timeoutSeconds``) resumes from the last version seen; ``410 Gone``
(that version was compacted away) lists again. A peer change is seen within
one event, not up to ``interval_s`` later. When a list or a watch fails, the
sidecar falls back to polling: one list every ``interval_s`` through the
``lister`` (the official client in a worker thread, the gateway's
list-and-replace approach), trying the watch again after each. Without a
watcher it polls only. An open watch outlives a revoked RoleBinding (the API
server authorizes a watch when it starts), so a refusal shows at the next
renewal, every ``EndpointSliceWatcher.timeout_s`` (300 s; the sidecar setting
``discovery_watch_timeout_s``).

A failed list (API server unreachable, RBAC denied, timeout) keeps the last
known peers and logs a warning; so does a list with no usable endpoint (the
sidecar's own pod is always in it, with ``publishNotReadyAddresses``, so an
empty answer is a lagging or misconfigured view, not "no replicas"). Until the
first useful list the sidecar routes to the ``--peer`` URLs it was started
with (the operator passes the pod's own engine on loopback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from modelfleet.dataplane.sidecar.service import Coordinator

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
WARN_EVERY_S = 60.0  # a persistent failure is logged again at most this often
WATCH_TIMEOUT_S = 300  # the API server ends each watch after this; the sidecar resumes from its last version


def _slice_port(slice_: Mapping[str, Any], port_name: str, default_port: int | None) -> int | None:
    for port in slice_.get("ports") or []:
        if (port.get("name") or "") == port_name and isinstance(port.get("port"), int):
            return int(port["port"])
    return default_port


def endpoint_url(address: str, port: int) -> str:
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
                urls.update(endpoint_url(address, port) for address in endpoint.get("addresses") or [])
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


class WatchGone(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass
class ApiAccess:
    """How aiohttp reaches the API server: its base URL, the auth headers of the moment, TLS."""

    host: str
    headers: Callable[[], dict[str, str]]
    ssl: ssl.SSLContext | bool = True


def api_access() -> ApiAccess:
    """From the official client's configuration (in-cluster, else kubeconfig), as the lister uses it."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    cfg: Any = client.Configuration.get_default_copy()
    tls: ssl.SSLContext | bool = False
    if cfg.verify_ssl:
        tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:  # client certificates (a kubeconfig's user)
        if not isinstance(tls, ssl.SSLContext):
            tls = ssl.create_default_context()
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        tls.load_cert_chain(cfg.cert_file, cfg.key_file)

    def headers() -> dict[str, str]:
        if cfg.refresh_api_key_hook is not None:  # in-cluster: the projected token is rotated on disk
            cfg.refresh_api_key_hook(cfg)
        token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
        return {"Authorization": token} if token else {}

    return ApiAccess(str(cfg.host).rstrip("/"), headers, tls)


class EndpointSliceWatcher:
    """List and watch one Service's EndpointSlices with aiohttp (the Kubernetes watch API, streamed)."""

    def __init__(self, access: ApiAccess, namespace: str, service: str, timeout_s: int = WATCH_TIMEOUT_S) -> None:
        self.access = access
        self.timeout_s = timeout_s
        self.url = f"{access.host}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        self.selector = f"{SERVICE_NAME_LABEL}={service}"

    async def list(self, session: aiohttp.ClientSession) -> tuple[list[dict[str, Any]], str]:
        """The slices and the list's resourceVersion."""
        params = {"labelSelector": self.selector}
        timeout = aiohttp.ClientTimeout(total=10)
        async with session.get(
            self.url, params=params, headers=self.access.headers(), ssl=self.access.ssl, timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"list answered {resp.status} {resp.reason}")
            body = await resp.json()
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def watch(self, session: aiohttp.ClientSession, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        """The events after ``resource_version`` until the server ends the watch; WatchGone on 410."""
        params = {
            "labelSelector": self.selector,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.timeout_s),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout_s + 30)
        async with session.get(
            self.url, params=params, headers=self.access.headers(), ssl=self.access.ssl, timeout=timeout
        ) as resp:
            if resp.status == 410:
                raise WatchGone()
            if resp.status != 200:
                raise RuntimeError(f"watch answered {resp.status} {resp.reason}")
            buffer = b""
            async for data in resp.content.iter_any():  # one JSON event per line; a slice may be a long line
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchGone()
                        raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message', '')}"[:300])
                    yield event


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
        watcher: EndpointSliceWatcher | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.lister = lister
        self.watcher = watcher
        self.slices: dict[str, dict[str, Any]] = {}  # the watch's view: slice name -> slice
        self.resource_version = ""
        self._watch_failing = False
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
        return await self._apply(slices)

    async def _apply(self, slices: Iterable[Mapping[str, Any]]) -> bool:
        """Hands the peers of these slices to the coordinator; True when the peer set changed."""
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
        if self.watcher is None:
            while True:
                await self.refresh()
                await asyncio.sleep(self.interval_s)
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.list_and_watch(session)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # API server unreachable, RBAC, a broken stream: poll, then watch again
                    if not self._watch_failing:  # once per outage; the polls report their own failures
                        self._watch_failing = True
                        log.warning(
                            "watching the EndpointSlices of %s failed (%s); polling every %g s until it works",
                            self.service,
                            _describe(exc),
                            self.interval_s,
                        )
                    await self.refresh()
                    await asyncio.sleep(self.interval_s)

    async def list_and_watch(self, session: aiohttp.ClientSession) -> None:
        """One list, then watches from its resourceVersion; returns on 410 Gone (the caller lists again)."""
        assert self.watcher is not None
        items, self.resource_version = await self.watcher.list(session)
        if self._watch_failing:
            self._watch_failing = False
            log.info("watching the EndpointSlices of %s again", self.service)
        self.slices = {_name(s): s for s in items}
        await self._apply(self.slices.values())
        while True:
            started, events = time.monotonic(), 0
            try:
                async for event in self.watcher.watch(session, self.resource_version):
                    events += 1
                    self._on_event(event)
                    if event.get("type") != "BOOKMARK":
                        await self._apply(self.slices.values())
            except WatchGone:
                log.info("watch of %s expired (410 Gone); listing again", self.service)
                return
            if not events and time.monotonic() - started < 1.0:
                raise RuntimeError("the watch ended at once")  # not the server's timeout: poll for a while
            # the server ended the watch (timeoutSeconds): resume from the last version seen

    def _on_event(self, event: Mapping[str, Any]) -> None:
        obj = event.get("object") or {}
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        kind = event.get("type")
        if kind in ("ADDED", "MODIFIED"):
            self.slices[_name(obj)] = obj
        elif kind == "DELETED":
            self.slices.pop(_name(obj), None)


def _name(slice_: Mapping[str, Any]) -> str:
    return str((slice_.get("metadata") or {}).get("name", ""))
