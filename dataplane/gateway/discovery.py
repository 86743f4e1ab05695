"""Cluster mode: the routing table built from InferenceDeployment objects.

The gateway lists the objects every few seconds and routes each served model
id to the deployment's Service (``status.endpoint``). A deployment with no
ready replica keeps its route with no endpoint, so its clients get a 503 with
Retry-After rather than a 404.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable
from modelfleet.dataplane.spec import API_GROUP, API_VERSION, PLURAL, RuntimeKind

RUNTIMES = frozenset(kind.value for kind in RuntimeKind)

log = logging.getLogger(__name__)


def routes_from_objects(items: list[Mapping[str, Any]]) -> list[DeploymentRoute]:
    """Routes for every deployment; the oldest object wins a contested model id."""
    routes: list[DeploymentRoute] = []
    taken: set[str] = set()
    ordered = sorted(items, key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["name"]))
    for obj in ordered:
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        model = spec.get("model") or {}
        names = [n for n in [model.get("name"), *(model.get("aliases") or [])] if n and n not in taken]
        if not names:
            continue
        taken.update(names)
        ready = int(status.get("readyReplicas") or 0) > 0
        endpoint = status.get("endpoint")
        meta = obj["metadata"]
        runtime = (spec.get("runtime") or {}).get("kind") or RuntimeKind.TORCH.value
        routes.append(
            DeploymentRoute(
                name=f"{meta.get('namespace', 'default')}/{meta['name']}",
                models=names,
                endpoints=[endpoint] if endpoint and ready else [],
                runtime=RuntimeKind(runtime) if runtime in RUNTIMES else RuntimeKind.TORCH,
            )
        )
    return routes


def list_deployments() -> list[Mapping[str, Any]]:
    """All InferenceDeployments the gateway's ServiceAccount may list (blocking)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    api = client.CustomObjectsApi()
    result: dict[str, Any] = api.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)  # type: ignore[assignment]
    items: list[Mapping[str, Any]] = result.get("items", [])
    return items


async def refresh_forever(
    install: Callable[[RoutingTable], None],
    interval_s: float = 5.0,
    lister: Callable[[], list[Mapping[str, Any]]] = list_deployments,
) -> None:
    while True:
        try:
            items = await asyncio.to_thread(lister)
            install(RoutingTable(routes_from_objects(items)))
        except Exception as exc:  # keep the last good table; the API server may be restarting
            log.warning("refreshing routes from the cluster failed: %s", type(exc).__name__)
        await asyncio.sleep(interval_s)
