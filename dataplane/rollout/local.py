"""Rollouts on one machine: ``modelfleet up`` watches its manifest and runs the rollout a cluster would.

When a deployment whose ``spec.rollout`` is set changes its version
(dataplane/rollout/version.py, the operator's rule too: anything but
``replicas``, ``rollout`` and a Remote runtime's ``runtime.remote``), the
launcher starts candidate engines with the new spec beside the running ones,
and once they are ready writes the rollout plan
(dataplane/rollout/plan.py) to the file its sidecars read (``--rollout-file``).
Every ``analysisIntervalSeconds`` it collects the sidecars' observations
(``GET /rollout/observations``), runs the release gate and follows
``next_action``:

- ADVANCE: the next canary step's weight goes into the plan;
- PROMOTE: the sidecars restart with the candidate engines as their replicas
  (about a second each, one after the other; the gateway retries a refused
  connection on another sidecar), the old engines stop, the plan is removed;
- ROLLBACK: the plan is removed and the candidate engines stop; the rejected
  spec is remembered and not tried again until the manifest changes again;
- HOLD / WAIT: nothing changes; a new reason is printed.

Each judgement's report is written to ``<workdir>/<deployment>.gate-report.json``.
A deployment without ``spec.rollout`` whose spec changes is reported and left
as it is: restart ``modelfleet up`` to apply such a change; so is a change of
the spill-over tiers' names (their engines start with ``modelfleet up``).
The candidate's share goes from the baseline's sidecars straight to its
engines, so a routing or spill-over change is judged on those engines and
reaches the sidecars when they restart on promote.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import yaml

from modelfleet.dataplane.manifest import ManifestError, load_manifests
from modelfleet.dataplane.rollout.gate import evaluate
from modelfleet.dataplane.rollout.observations import Observation, RolloutInputError, parse_policy
from modelfleet.dataplane.rollout.plan import Action, Progress, next_action, plan_for, sides
from modelfleet.dataplane.rollout.version import spec_version
from modelfleet.dataplane.spec import InferenceDeployment

PLAN_REFRESH_S = 1.5  # sidecars read the plan file at most once a second (sidecar/rollout.py), plus a margin


class Children(Protocol):
    """What the controller needs from the launcher's stack (dataplane/launcher.py)."""

    def spawn_engines(self, dep: InferenceDeployment, manifest: Path, label: str) -> list[Any]: ...

    def stop_children(self, children: list[Any]) -> None: ...

    def repoint_sidecars(self, name: str, manifest: Path, engines: list[Any]) -> None: ...

    def ready(self, child: Any) -> bool: ...

    def sidecar_urls(self, name: str) -> list[str]: ...


@dataclass
class Rollout:
    dep: InferenceDeployment
    manifest: Path
    candidates: list[Any]
    rollout_id: str
    started_at: float
    step: int = 0
    step_started_at: float = 0.0
    live: bool = False  # the plan is written: traffic flows
    last_judged: float = 0.0
    last_reason: str = ""


@dataclass
class LocalRollouts:
    """One per ``modelfleet up``; ``tick`` is called from the launcher's supervision loop."""

    manifest: Path
    workdir: Path
    children: Children
    out: TextIO
    baseline: dict[str, InferenceDeployment] = field(default_factory=dict)
    engines: dict[str, list[Any]] = field(default_factory=dict)
    running: dict[str, Rollout] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # deployment -> spec hash rolled back
    _stamp: tuple[float, int] | None = None
    _checked: float = 0.0
    _generation: int = 0

    def __post_init__(self) -> None:
        self._stamp = self._file_stamp()

    def report_file(self, name: str) -> Path:
        return self.workdir / f"{name}.gate-report.json"

    def plan_file(self, name: str) -> Path:
        return self.workdir / f"{name}.rollout.json"

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.manifest.stat()
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def _say(self, text: str) -> None:
        print(f"  rollout: {text}", file=self.out, flush=True)

    # ---- the loop -------------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._checked >= 1.0:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                self._manifest_changed(now)
        for name, rollout in list(self.running.items()):
            self._advance(name, rollout, now)

    def _manifest_changed(self, now: float) -> None:
        try:
            deployments = {d.metadata.name: d for d in load_manifests(self.manifest)}
        except ManifestError as exc:
            self._say(f"the changed manifest is not applied: {exc}")
            return
        for name, dep in deployments.items():
            base = self.baseline.get(name)
            if base is None:
                continue  # a new deployment needs a restart of modelfleet up
            new_hash = spec_version(dep.spec)
            running = self.running.get(name)
            if running is not None and spec_version(running.dep.spec) == new_hash:
                continue
            if new_hash == spec_version(base.spec) or self.rejected.get(name) == new_hash:
                continue
            if dep.spec.rollout is None:
                self._say(f"{name}: the spec changed without spec.rollout; restart modelfleet up to apply it")
                continue
            if _tier_names(dep) != _tier_names(base):
                self._say(f"{name}: spec.spillover's tiers changed; restart modelfleet up to start their engines")
                continue
            if running is not None:
                self._say(f"{name}: the spec changed again; the running rollout {running.rollout_id} stops")
                self._end(name, running, promoted=False)
            self._start(name, dep, now)

    def _start(self, name: str, dep: InferenceDeployment, now: float) -> None:
        self._generation += 1
        manifest = self.workdir / f"{name}-candidate-{self._generation}.yaml"
        doc = {"apiVersion": dep.api_version, "kind": dep.kind, "metadata": {"name": name}, "spec": dep.spec.to_wire()}
        manifest.write_text(yaml.safe_dump(doc, sort_keys=True))
        rollout_id = f"{name}-{spec_version(dep.spec)}-{self._generation}"
        candidates = self.children.spawn_engines(dep, manifest, f"candidate{self._generation}")
        self.running[name] = Rollout(dep, manifest, candidates, rollout_id, started_at=now, step_started_at=now)
        assert dep.spec.rollout is not None
        self._say(
            f"{name}: spec changed; starting {len(candidates)} candidate engine(s) for a "
            f"{dep.spec.rollout.strategy.value} rollout ({rollout_id})"
        )

    def _advance(self, name: str, rollout: Rollout, now: float) -> None:
        spec = rollout.dep.spec.rollout
        assert spec is not None
        if not rollout.live:
            if all(self.children.ready(c) for c in rollout.candidates):
                rollout.live = True
                rollout.started_at = rollout.step_started_at = rollout.last_judged = now
                self._write_plan(name, rollout)
                self._say(f"{name}: candidate ready; traffic plan written (step 1)")
            elif now - rollout.started_at > spec.max_duration_seconds:
                self._say(f"{name}: the candidate never became ready; rolling back")
                self._end(name, rollout, promoted=False)
            return
        if now - rollout.last_judged < spec.analysis_interval_seconds:
            return
        rollout.last_judged = now
        report = self._judge(name, rollout)
        progress = Progress(rollout.step, rollout.started_at, rollout.step_started_at)
        action, reason = next_action(spec, progress, report.get("decision"), now)
        detail = "; ".join(report.get("reasons", [])[:3])
        said = f"{action.value}: {reason}" + (f" ({detail})" if detail else "")
        if said != rollout.last_reason or action not in (Action.HOLD, Action.WAIT):
            self._say(f"{name}: {said}")
            rollout.last_reason = said
        if action is Action.ADVANCE:
            rollout.step += 1
            rollout.step_started_at = now
            self._write_plan(name, rollout)
        elif action is Action.PROMOTE:
            self._end(name, rollout, promoted=True)
        elif action is Action.ROLLBACK:
            self.rejected[name] = spec_version(rollout.dep.spec)
            self._end(name, rollout, promoted=False)

    def _write_plan(self, name: str, rollout: Rollout) -> None:
        spec = rollout.dep.spec.rollout
        assert spec is not None
        plan = plan_for(spec, rollout.rollout_id, rollout.step, [c.url for c in rollout.candidates])
        base = self.baseline[name]
        plan = plan.model_copy(
            update=sides(base.spec, rollout.dep.spec, spec_version(base.spec), spec_version(rollout.dep.spec))
        )
        tmp = self.plan_file(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(plan.to_wire()))
        tmp.replace(self.plan_file(name))  # atomic: a sidecar never reads half a plan

    def _judge(self, name: str, rollout: Rollout) -> dict[str, Any]:
        spec = rollout.dep.spec.rollout
        assert spec is not None
        baseline: dict[str, Observation] = {}
        candidate: dict[str, Observation] = {}
        for url in self.children.sidecar_urls(name):
            got = _get_json(f"{url}/rollout/observations?id={rollout.rollout_id}")
            for side, into in (("baseline", baseline), ("candidate", candidate)):
                for raw in got.get(side, []):
                    try:
                        obs = Observation.model_validate(raw)
                    except ValueError:
                        continue
                    into[obs.request_id] = obs
        try:
            policy = parse_policy(spec.gate.policy())
            report = evaluate(policy, list(baseline.values()), list(candidate.values()))
        except RolloutInputError as exc:
            report = {"decision": "hold", "reasons": [str(exc)]}
        self.report_file(name).write_text(json.dumps(report, indent=2, sort_keys=True))
        return report

    def _end(self, name: str, rollout: Rollout, *, promoted: bool) -> None:
        self.plan_file(name).unlink(missing_ok=True)
        time.sleep(PLAN_REFRESH_S)  # every sidecar has dropped the plan before its candidate engines stop
        del self.running[name]
        if promoted:
            old = self.engines.get(name, [])
            self.children.repoint_sidecars(name, rollout.manifest, rollout.candidates)
            self.children.stop_children(old)
            self.engines[name] = rollout.candidates
            self.baseline[name] = rollout.dep
            self._say(f"{name}: promoted; the candidate engines now serve (report: {self.report_file(name)})")
        else:
            self.children.stop_children(rollout.candidates)
            self._say(f"{name}: rolled back; the baseline keeps serving (report: {self.report_file(name)})")


def _tier_names(dep: InferenceDeployment) -> list[str]:
    return sorted(t.name for t in dep.spec.spillover.tiers) if dep.spec.spillover else []


def _get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read() or b"{}")
    except (OSError, ValueError, urllib.error.HTTPError):
        return {}
    return body if isinstance(body, dict) else {}
