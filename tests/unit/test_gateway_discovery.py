"""Cluster-mode routes from InferenceDeployment objects."""

from __future__ import annotations

import pytest

from modelfleet.dataplane.gateway.discovery import routes_from_objects
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.protocol import ApiError


def obj(name, model, aliases=(), ready=1, endpoint="http://svc", created="2026-01-01T00:00:00Z", ns="llm"):
    return {
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": {"model": {"name": model, "aliases": list(aliases)}},
        "status": {"readyReplicas": ready, "endpoint": endpoint},
    }


def test_ready_deployments_route_to_their_service():
    (route,) = routes_from_objects([obj("chat", "m", ["alias"])])
    assert route.name == "llm/chat" and route.models == ["m", "alias"] and route.endpoints == ["http://svc"]


def test_unready_deployment_keeps_its_route_without_endpoints():
    table = RoutingTable(routes_from_objects([obj("chat", "m", ready=0)]))
    assert table.lookup("m").endpoints == []
    with pytest.raises(ApiError) as err:
        table.lookup("other")
    assert err.value.status == 404


def test_oldest_deployment_wins_a_contested_model_id():
    newer = obj("b", "m", created="2026-02-01T00:00:00Z", endpoint="http://b")
    older = obj("a", "m", ["x"], created="2026-01-01T00:00:00Z", endpoint="http://a")
    routes = routes_from_objects([newer, older])
    assert [(r.name, r.models) for r in routes] == [("llm/a", ["m", "x"])]
