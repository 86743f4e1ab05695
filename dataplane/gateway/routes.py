"""The gateway's routing table: served model id -> deployment -> endpoints."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from modelfleet.dataplane.protocol import model_not_found


class DeploymentRoute(BaseModel):
    """One deployment as the gateway sees it: its model ids and sidecar endpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    models: list[str]
    endpoints: list[str]
    created: int = 0


class RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployments: list[DeploymentRoute]


@dataclass
class _Entry:
    route: DeploymentRoute
    cursor: Iterator[int] = field(default_factory=itertools.count)


class RoutingTable:
    def __init__(self, routes: list[DeploymentRoute]) -> None:
        self._by_model: dict[str, _Entry] = {}
        self._deployments: list[DeploymentRoute] = list(routes)
        for route in routes:
            entry = _Entry(route)
            for model in route.models:
                if model in self._by_model:
                    raise ValueError(f"model id {model!r} is served by two deployments")
                self._by_model[model] = entry

    @classmethod
    def from_file(cls, path: Path) -> RoutingTable:
        return cls(RoutesFile.model_validate(json.loads(path.read_text())).deployments)

    def deployments(self) -> list[DeploymentRoute]:
        return list(self._deployments)

    def lookup(self, model: str) -> DeploymentRoute:
        entry = self._by_model.get(model)
        if entry is None:
            raise model_not_found(model)
        return entry.route

    def endpoints_in_turn(self, route: DeploymentRoute) -> list[str]:
        """The deployment's endpoints rotated, so load spreads over its sidecars."""
        entry = self._by_model[route.models[0]]
        start = next(entry.cursor) % max(len(route.endpoints), 1)
        return route.endpoints[start:] + route.endpoints[:start]

    def model_ids(self) -> list[tuple[str, DeploymentRoute]]:
        return [(m, e.route) for m, e in self._by_model.items()]
