"""The one rule of what makes a new version (dataplane/rollout/version.py), field by field, and the local
controller following it: a routing change starts a rollout under ``modelfleet up``, a replicas change none.
The cluster side of the same behaviour is e2e/test_rollout.py."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from modelfleet.dataplane.rollout.local import LocalRollouts
from modelfleet.dataplane.rollout.version import spec_version, version_config
from modelfleet.dataplane.spec import InferenceDeployment, InferenceDeploymentSpec

TORCH: dict[str, Any] = {
    "model": {"name": "m", "source": {"path": "/models/m"}},
    "runtime": {"kind": "torch", "device": "cpu"},
}
REMOTE: dict[str, Any] = {
    "model": {"name": "m", "source": {"runtimeManaged": True}},
    "runtime": {"kind": "remote", "remote": {"baseUrl": "https://api.example.com/v1", "model": "m-large"}},
}
SPILL = {"tiers": [{"name": "cloud", "remote": {"baseUrl": "https://api.example.com/v1", "model": "m-large"}}]}
OTHER_ENDPOINT = {
    "baseUrl": "https://other.example.com/v1",
    "model": "m-small",
    "maxRetries": 0,
    "rateLimits": {"requestsPerMinute": 60},
    "pricing": {"inputUsdPerMillion": 1.5},
}
ROLLOUT = {"strategy": "Canary", "steps": [{"weight": 10, "holdSeconds": 60}]}


def spec(base: dict[str, Any], **fields: Any) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate({**base, **fields})


# each row: a changed field, and whether it makes a new version (docs/rollouts.md, "What starts a rollout")
NEW_VERSION = [
    ("model", TORCH, {"model": {"name": "m", "source": {"path": "/models/m2"}}}),
    ("model.quantization", TORCH, {"model": {**TORCH["model"], "quantization": "int8"}}),
    ("runtime", TORCH, {"runtime": {"kind": "torch", "device": "cpu", "cpuThreads": 2}}),
    ("runtime.kind", TORCH, {"runtime": REMOTE["runtime"], "model": REMOTE["model"]}),
    ("engine", TORCH, {"engine": {"maxNumSeqs": 4}}),
    ("placement", TORCH, {"placement": {"gpuTypes": ["L4"]}}),
    ("routing", TORCH, {"routing": {"policy": "PrefixAffinity"}}),
    ("routing.prefixChars", TORCH, {"routing": {"prefixChars": 64}}),
    ("spillover", TORCH, {"spillover": SPILL}),
    ("spillover.when", TORCH, {"spillover": {**SPILL, "when": {"queueDepthAbove": 3}}}),
    ("remote runtime's model", REMOTE, {"model": {**REMOTE["model"], "aliases": ["chat"]}}),
]
SAME_VERSION = [
    ("replicas", TORCH, {"replicas": 7}),
    ("replicas to zero", TORCH, {"replicas": 0}),
    ("rollout", TORCH, {"rollout": ROLLOUT}),
    ("remote runtime's runtime.remote", REMOTE, {"runtime": {"kind": "remote", "remote": OTHER_ENDPOINT}}),
]


@pytest.mark.parametrize(("field", "base", "change"), NEW_VERSION, ids=[r[0] for r in NEW_VERSION])
def test_a_change_that_makes_a_new_version(field: str, base: dict[str, Any], change: dict[str, Any]) -> None:
    assert spec_version(spec(base)) != spec_version(spec(base, **change))


@pytest.mark.parametrize(("field", "base", "change"), SAME_VERSION, ids=[r[0] for r in SAME_VERSION])
def test_a_change_applied_in_place(field: str, base: dict[str, Any], change: dict[str, Any]) -> None:
    assert spec_version(spec(base)) == spec_version(spec(base, **change))


def test_every_spec_field_has_a_rule() -> None:
    """A new top-level spec field must be placed on one side (and this test's tables and the docs told)."""
    covered = {f.split(".")[0].split(" ")[0] for f, _, _ in NEW_VERSION + SAME_VERSION}
    assert set(InferenceDeploymentSpec.model_fields) <= covered, covered
    full = spec(TORCH, replicas=3, rollout=ROLLOUT, routing={"policy": "RoundRobin"}, spillover=SPILL)
    assert set(version_config(full)) == set(full.to_wire()) - {"replicas", "rollout"}


def test_the_version_is_stable_and_sixteen_hex_digits() -> None:
    """Equal specs, equal versions across processes (sorted JSON, no object ids); 16 digits as the operator's
    config-hash annotation always had, so an upgrade restarts no pods."""
    version = spec_version(spec(TORCH, engine={"maxNumSeqs": 4}))
    assert version == spec_version(spec(TORCH, engine={"maxNumSeqs": 4}))
    assert len(version) == 16 and int(version, 16) >= 0


# ---- the local controller (dataplane/rollout/local.py) follows the rule ----------------------------------------


class FakeChildren:
    """The launcher's side of LocalRollouts, recording what it was asked to do."""

    def __init__(self) -> None:
        self.spawned: list[InferenceDeployment] = []

    def spawn_engines(self, dep: InferenceDeployment, manifest: Path, label: str) -> list[Any]:
        self.spawned.append(dep)
        return [SimpleNamespace(url=f"http://127.0.0.1:{9000 + len(self.spawned)}")]

    def stop_children(self, children: list[Any]) -> None:
        pass

    def repoint_sidecars(self, name: str, manifest: Path, engines: list[Any]) -> None:
        pass

    def ready(self, child: Any) -> bool:
        return False

    def sidecar_urls(self, name: str) -> list[str]:
        return []


def document(**fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "chat"},
        "spec": {**TORCH, "rollout": ROLLOUT, **fields},
    }


def controller(tmp_path: Path) -> tuple[LocalRollouts, FakeChildren, Path, io.StringIO]:
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(document()))
    children, out = FakeChildren(), io.StringIO()
    ctl = LocalRollouts(path, tmp_path, children, out)
    ctl.baseline["chat"] = InferenceDeployment.model_validate(document())
    return ctl, children, path, out


def edit(path: Path, doc: dict[str, Any], ctl: LocalRollouts, now: float) -> None:
    path.write_text(yaml.safe_dump(doc))
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + int(now * 1e9)))  # a new stamp even within a tick
    ctl.tick(now)


def test_locally_a_routing_change_starts_a_rollout(tmp_path: Path) -> None:
    ctl, children, path, out = controller(tmp_path)
    edit(path, document(routing={"policy": "PrefixAffinity"}), ctl, now=10.0)
    assert [d.spec.routing.policy.value for d in children.spawned] == ["PrefixAffinity"]
    assert "chat" in ctl.running and "Canary rollout" in out.getvalue()
    assert ctl.running["chat"].rollout_id.startswith(f"chat-{spec_version(children.spawned[0].spec)}-")


def test_locally_a_replicas_or_rollout_change_starts_none(tmp_path: Path) -> None:
    ctl, children, path, out = controller(tmp_path)
    edit(path, document(replicas=3), ctl, now=10.0)
    edit(path, document(replicas=3, rollout={**ROLLOUT, "strategy": "Shadow"}), ctl, now=20.0)
    assert children.spawned == [] and ctl.running == {} and out.getvalue() == ""
    edit(path, document(replicas=3, engine={"maxNumSeqs": 4}), ctl, now=30.0)  # the edits were read: this one rolls
    assert len(children.spawned) == 1


def test_locally_a_renamed_spillover_tier_asks_for_a_restart(tmp_path: Path) -> None:
    """The tiers' engines start with ``modelfleet up``; a promoted sidecar could not find a renamed one."""
    ctl, children, path, out = controller(tmp_path)
    ctl.baseline["chat"] = InferenceDeployment.model_validate(document(spillover=SPILL))
    renamed = {"tiers": [{**SPILL["tiers"][0], "name": "hosted"}]}
    edit(path, document(spillover=renamed), ctl, now=10.0)
    assert children.spawned == [] and "restart modelfleet up" in out.getvalue()
    edit(path, document(spillover={**SPILL, "when": {"queueDepthAbove": 3}}), ctl, now=20.0)
    assert len(children.spawned) == 1  # same tiers, a new rule: a rollout
