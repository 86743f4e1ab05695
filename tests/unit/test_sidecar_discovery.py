"""Peer discovery in cluster mode: EndpointSlices -> peer URLs, and the Coordinator following them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from modelfleet.dataplane.sidecar.discovery import (
    ApiAccess,
    EndpointSliceWatcher,
    PeerDiscovery,
    endpoint_takes_traffic,
    peers_from_slices,
)
from modelfleet.dataplane.sidecar.metrics import SidecarMetrics
from modelfleet.dataplane.sidecar.routing import make_policy
from modelfleet.dataplane.sidecar.service import Coordinator


def endpoint(*addresses: str, ready: bool | None = True, terminating: bool | None = None) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    if terminating is not None:
        conditions["terminating"] = terminating
    return {"addresses": list(addresses), "conditions": conditions}


def slice_(name: str, *endpoints: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "chat-peers"}},
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "engine", "port": 8001, "protocol": "TCP"}] if ports is None else ports,
    }


def test_ready_endpoints_become_sorted_urls_on_the_engine_port():
    s = slice_("a", endpoint("10.0.0.9"), endpoint("10.0.0.10"))
    assert peers_from_slices([s]) == ["http://10.0.0.10:8001", "http://10.0.0.9:8001"]


def test_not_ready_and_terminating_endpoints_are_left_out():
    s = slice_(
        "a",
        endpoint("10.0.0.1"),
        endpoint("10.0.0.2", ready=False),
        endpoint("10.0.0.3", ready=True, terminating=True),  # publishNotReadyAddresses keeps terminating ones ready
        endpoint("10.0.0.4", ready=False, terminating=True),
        endpoint("10.0.0.5", ready=None),  # unset: ready, as the API documents
        endpoint("10.0.0.6", ready=True, terminating=False),
    )
    assert peers_from_slices([s]) == ["http://10.0.0.1:8001", "http://10.0.0.5:8001", "http://10.0.0.6:8001"]
    assert endpoint_takes_traffic({"addresses": ["10.0.0.7"]})  # no conditions at all


def test_several_slices_are_joined_and_duplicates_dropped():
    a = slice_("a", endpoint("10.0.0.1"), endpoint("10.0.0.2"))
    b = slice_("b", endpoint("10.0.0.2"), endpoint("10.0.0.3"))  # an endpoint moving between slices
    assert peers_from_slices([a, b]) == ["http://10.0.0.1:8001", "http://10.0.0.2:8001", "http://10.0.0.3:8001"]
    assert peers_from_slices([]) == []
    assert peers_from_slices([slice_("empty")]) == []


def test_port_comes_from_the_named_slice_port_else_the_default():
    two_ports = [{"name": "metrics", "port": 9090}, {"name": "engine", "port": 9001}]
    assert peers_from_slices([slice_("a", endpoint("10.0.0.1"), ports=two_ports)]) == ["http://10.0.0.1:9001"]
    unnamed = [{"port": 7000}]
    assert peers_from_slices([slice_("a", endpoint("10.0.0.1"), ports=unnamed)]) == []  # skipped, with a warning
    assert peers_from_slices([slice_("a", endpoint("10.0.0.1"), ports=unnamed)], default_port=8001) == [
        "http://10.0.0.1:8001"
    ]
    assert peers_from_slices([slice_("a", endpoint("10.0.0.1"), ports=unnamed)], port_name="") == [
        "http://10.0.0.1:7000"
    ]
    # per slice: pods whose named port resolves differently land in different slices
    a = slice_("a", endpoint("127.0.0.1"), ports=[{"name": "engine", "port": 9001}])
    b = slice_("b", endpoint("127.0.0.1"), ports=[{"name": "engine", "port": 9002}])
    assert peers_from_slices([a, b]) == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def test_ipv6_addresses_are_bracketed():
    s = slice_("a", endpoint("fd00::1"))
    s["addressType"] = "IPv6"
    assert peers_from_slices([s]) == ["http://[fd00::1]:8001"]


class Lister:
    def __init__(self) -> None:
        self.answer: list[dict[str, Any]] | Exception = []

    def __call__(self) -> list[dict[str, Any]]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def coordinator(*urls: str) -> Coordinator:
    return Coordinator("chat", list(urls), make_policy("RoundRobin"), SidecarMetrics())


async def test_coordinator_follows_the_slices_and_keeps_peers_on_errors(caplog):
    caplog.set_level(logging.INFO, logger="modelfleet.dataplane.sidecar.discovery")
    coord = coordinator("http://127.0.0.1:8001")  # the bootstrap --peer, until the first useful list
    lister = Lister()
    discovery = PeerDiscovery(coord, lister, service="ns/chat-peers", interval_s=0.01)

    lister.answer = []  # no endpoint yet (the slice controller lags): keep the bootstrap peer
    assert not await discovery.refresh()
    assert [p.url for p in coord.peers] == ["http://127.0.0.1:8001"]

    lister.answer = [slice_("a", endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False))]
    assert await discovery.refresh()
    assert [p.url for p in coord.peers] == ["http://10.0.0.1:8001"]
    coord.peers[0].healthy = True  # as a health check would find it
    coord.peers[0].outstanding = 3

    lister.answer = [slice_("a", endpoint("10.0.0.1"), endpoint("10.0.0.2"))]
    assert await discovery.refresh()
    assert [p.url for p in coord.peers] == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]
    assert coord.peers[0].healthy and coord.peers[0].outstanding == 3  # a known peer keeps its state
    assert not await discovery.refresh()  # nothing changed

    caplog.clear()
    lister.answer = ConnectionRefusedError("api server down")
    for _ in range(3):
        assert not await discovery.refresh()
    assert [p.url for p in coord.peers] == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ConnectionRefusedError" in warnings[0].getMessage()  # once per outage
    assert "keeping the 2 known peers" in warnings[0].getMessage()

    lister.answer = [slice_("a", endpoint("10.0.0.1"), endpoint("10.0.0.2", terminating=True))]
    assert await discovery.refresh()
    assert [p.url for p in coord.peers] == ["http://10.0.0.1:8001"]
    assert any("peers again" in r.getMessage() for r in caplog.records)


def test_cli_cluster_mode_flags_reach_the_settings(monkeypatch, capsys):
    from modelfleet.dataplane import cli
    from modelfleet.dataplane.sidecar import main as sidecar_main

    seen = []
    monkeypatch.setattr(sidecar_main, "run", lambda settings, *sections: seen.append(settings))
    argv = ["sidecar", "--deployment", "chat", "--kubernetes", "--service", "chat-peers", "--namespace", "llm"]
    assert cli.main([*argv, "--engine-port", "8001", "--discovery-interval", "0.5", "--port", "8000"]) == 0
    (s,) = seen
    assert (s.kubernetes, s.service, s.namespace, s.engine_port, s.engine_port_name) == (
        True, "chat-peers", "llm", 8001, "engine",
    )  # fmt: skip
    assert s.discovery_interval_s == 0.5 and s.peers == []
    assert cli.main(["sidecar", "--deployment", "chat", "--kubernetes", "--port", "8000"]) == 2
    assert "--service" in capsys.readouterr().err
    assert cli.main(["sidecar", "--deployment", "chat", "--port", "8000"]) == 2  # neither peers nor discovery


class FakeApiServer:
    """The EndpointSlice list and watch of a kube-apiserver, scripted: each watch plays the next script."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.version = "1"
        self.list_status = 200
        self.scripts: list[list[dict[str, Any]] | int] = []  # events, or an HTTP status to answer the watch with
        self.lists = 0
        self.watched_from: list[str] = []
        self.selectors: set[str] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.selectors.add(request.query["labelSelector"])
        if request.query.get("watch") != "1":
            self.lists += 1
            body = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": self.version}, "items": self.items}
            return web.json_response(body, status=self.list_status)
        self.watched_from.append(request.query["resourceVersion"])
        script = self.scripts.pop(0) if self.scripts else []
        if isinstance(script, int):
            return web.json_response({"kind": "Status", "code": script}, status=script)
        resp = web.StreamResponse()
        await resp.prepare(request)
        for event in script:
            await resp.write(json.dumps(event).encode() + b"\n")
            await asyncio.sleep(0.01)
        if not self.scripts:
            await asyncio.sleep(3600)  # the last watch stays open, as a real one does until timeoutSeconds
        return resp


def event(kind: str, obj: dict[str, Any], version: str) -> dict[str, Any]:
    obj = {**obj, "metadata": {**obj.get("metadata", {}), "resourceVersion": version}}
    return {"type": kind, "object": obj}


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[FakeApiServer, str]]:
    fake = FakeApiServer()
    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def wait_for(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def urls(coord: Coordinator) -> list[str]:
    return [p.url for p in coord.peers]


async def test_the_watch_follows_events_resumes_from_the_last_version_and_relists_on_410(api_server):
    fake, base = api_server
    fake.items, fake.version = [slice_("a", endpoint("10.0.0.1"))], "5"
    b = slice_("b", endpoint("10.0.0.2"))
    fake.scripts = [
        [
            event("ADDED", b, "6"),
            event("MODIFIED", slice_("a", endpoint("10.0.0.1", ready=False)), "7"),
            event("BOOKMARK", {"metadata": {}}, "8"),
        ],  # then the server ends this watch (its timeoutSeconds)
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}],
        [event("DELETED", b, "21")],
    ]
    coord = coordinator("http://127.0.0.1:8001")
    watcher = EndpointSliceWatcher(ApiAccess(base, lambda: {"Authorization": "Bearer t"}), "ns", "chat-peers")
    lister = Lister()
    discovery = PeerDiscovery(coord, lister, service="ns/chat-peers", interval_s=60, watcher=watcher)
    task = asyncio.create_task(discovery.run_forever())
    try:
        await wait_for(lambda: urls(coord) == ["http://10.0.0.2:8001"])  # b added, a not ready: no 5 s poll needed
        fake.items, fake.version = [slice_("a", endpoint("10.0.0.3")), b], "20"  # what the re-list will see
        await wait_for(lambda: fake.watched_from == ["5", "8", "20"] and urls(coord) == ["http://10.0.0.3:8001"])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert fake.lists == 2  # once at the start, once after 410 Gone
    assert fake.selectors == {"kubernetes.io/service-name=chat-peers"}


async def test_a_failing_watch_falls_back_to_polling_then_watches_again(api_server, caplog):
    fake, base = api_server
    fake.list_status = 403  # RBAC without list: the watcher cannot start
    coord = coordinator("http://127.0.0.1:8001")
    lister = Lister()
    lister.answer = [slice_("a", endpoint("10.0.0.7"))]
    watcher = EndpointSliceWatcher(ApiAccess(base, dict), "ns", "chat-peers")
    discovery = PeerDiscovery(coord, lister, service="ns/chat-peers", interval_s=0.05, watcher=watcher)
    task = asyncio.create_task(discovery.run_forever())
    try:
        await wait_for(lambda: urls(coord) == ["http://10.0.0.7:8001"])  # the polling fallback
        assert any("polling" in r.getMessage() for r in caplog.records)
        fake.list_status, fake.items = 200, [slice_("a", endpoint("10.0.0.8"))]
        fake.scripts = [410, []]  # a 410 status on the first watch: list again, then watch
        await wait_for(lambda: urls(coord) == ["http://10.0.0.8:8001"] and len(fake.watched_from) >= 2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
