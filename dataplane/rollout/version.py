"""What makes a new version of a deployment: the one rule both rollout controllers follow.

A *version* is what a judged rollout (canary or shadow, dataplane/rollout/plan.py)
puts beside the running one; :func:`spec_version` names it. The launcher
(``modelfleet up``, dataplane/rollout/local.py) and the operator (its rollouts and
the pod template's ``modelfleet.io/config-hash``, operator/resources/children.py)
both call it, so the same edit starts a rollout locally and in a cluster, or in
neither.

A field is part of the version when changing it changes what a request gets
(which weights answer, how, how fast, where it is sent) and the running
processes cannot take the change in place; the gate then has something to
judge. Left out, each because it is applied in place and judging it would
compare a version with itself:

- ``replicas``: scaling (the Deployment's replica count; locally a restart);
- ``rollout``: the strategy that judges versions, not a version (the
  controller reads it afresh each step);
- ``runtime.remote`` of a Remote runtime: the engine's config watch applies a
  new endpoint, key, headers, limits or prices to the running runner, keeping
  its spend ledger and connections (dataplane/engine/config_watch.py,
  docs/remote.md). Of any other runtime kind the field is kept (it is unused
  there, and a change of kind is a new version anyway).

Kept: ``model``, the rest of ``runtime``, ``engine``, ``placement``, and the
sidecar's ``routing`` and ``spillover``. The sidecar reads those two only when
it starts (dataplane/sidecar/main.py), so a change needs new sidecars, which in
a cluster share the engine's pod; and both change what users see: the routing
policy moves TTFT and latency through prefix-cache hits and load spread, a
spill-over rule or tier decides which requests a hosted model answers (other
outputs, other cost). Those are the errors, latencies and mismatches the gate
compares, so a routing or spill-over change is rolled out and judged like an
engine change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from modelfleet.dataplane.spec import InferenceDeploymentSpec, RuntimeKind

IN_PLACE_FIELDS = ("replicas", "rollout")  # top-level spec fields outside the version (and runtime.remote, above)
VERSION_LENGTH = 16  # hex digits: the operator's config-hash annotation has always had 16 (no pod churn on upgrade)


def version_config(spec: InferenceDeploymentSpec) -> dict[str, Any]:
    """The part of a spec (its wire form) whose change makes a new version."""
    wire = spec.to_wire()
    for key in IN_PLACE_FIELDS:
        wire.pop(key, None)
    if spec.runtime.kind is RuntimeKind.REMOTE:
        wire.get("runtime", {}).pop("remote", None)
    return wire


def spec_version(spec: InferenceDeploymentSpec) -> str:
    """The version's name: a hash of :func:`version_config`. Equal versions: nothing to roll out; different
    ones: a judged rollout where ``spec.rollout`` is set (without it a cluster rolls its pods and
    ``modelfleet up`` reports the change)."""
    config = json.dumps(version_config(spec), sort_keys=True)
    return hashlib.sha256(config.encode()).hexdigest()[:VERSION_LENGTH]
