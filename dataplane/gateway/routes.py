"""The gateway's routing table: served model id -> deployment -> endpoints."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from modelfleet.dataplane.protocol import model_not_found
from modelfleet.dataplane.runners.registry import forwards_requests
from modelfleet.dataplane.spec import RuntimeKind


class DeploymentRoute(BaseModel):
    """One deployment as the gateway sees it: its model ids, sidecar endpoints and runtime.

    ``runtime`` decides how strictly the gateway reads a request: an OpenAI-compatible backend's
    (vLLM, SGLang, remote) gets every field as sent (docs/openai-api.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    models: list[str]
    endpoints: list[str]
    created: int = 0
    runtime: RuntimeKind = RuntimeKind.TORCH

    @property
    def forwards(self) -> bool:
        return forwards_requests(self.runtime)


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

    def forwards(self, model: str) -> bool:
        """The model is served by a deployment whose backend takes requests as sent (False: unknown model)."""
        entry = self._by_model.get(model)
        return entry is not None and entry.route.forwards

    def endpoints_in_turn(self, route: DeploymentRoute) -> list[str]:
        """The deployment's endpoints rotated, so load spreads over its sidecars."""
        entry = self._by_model[route.models[0]]
        start = next(entry.cursor) % max(len(route.endpoints), 1)
        return route.endpoints[start:] + route.endpoints[:start]

    def model_ids(self) -> list[tuple[str, DeploymentRoute]]:
        return [(m, e.route) for m, e in self._by_model.items()]
