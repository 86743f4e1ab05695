"""kopf handlers: reconcile InferenceDeployments into their children.

* create / update / resume -> place, render the children, server-side apply them
  (plan and apply stay apart: ``resources.children`` renders, ``kube`` applies);
* events of the children -> fold their state into the CR status, and put back a
  child that was edited or deleted by hand;
* delete -> the finalizer removes the children (owner references would too,
  given a garbage collector);
* a daemon per deployment gathers the pods' /metrics into ``status.metrics``;
* with ``spec.rollout``, a change that needs new pods runs as a judged candidate beside the
  baseline, and a timer asks the release gate what to do next (``rollout``).

Kopf peering keeps a second operator replica paused while the first acts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from modelfleet.dataplane.spec import API_GROUP, API_VERSION, PLURAL, InferenceDeploymentSpec
from modelfleet.operator import metrics_snapshot, rollout, status
from modelfleet.operator.kube import Kube
from modelfleet.operator.placing import Placed, Unplaceable, place
from modelfleet.operator.resources import children, names
from modelfleet.operator.settings import OperatorSettings

FINALIZER = "modelfleet.io/finalizer"
CHILD_FILTER = {"app.kubernetes.io/managed-by": names.MANAGED_BY}


def _load_api() -> k8s_client.ApiClient:
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s_client.ApiClient()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    cfg = OperatorSettings()
    memo.cfg = cfg
    memo.kube = Kube(_load_api(), cfg.field_manager)
    memo.applied = {}
    memo.scrapes = {}
    memo.rollout_locks = {}  # (namespace, name) -> asyncio.Lock: reconciles and the rollout timer take turns
    memo.rollout_judged = {}  # (namespace, name) -> monotonic time of the last gate run
    memo.baselines = {}  # (namespace, name) -> the baseline spec last applied (if its ConfigMap is unreadable)
    settings.peering.mandatory = True
    # kopf pauses until its peering object exists; create it on first start
    await asyncio.to_thread(memo.kube.ensure_peering, cfg.peering_name, cfg.namespace)
    settings.persistence.finalizer = FINALIZER
    # kopf would post every INFO log line of a handler as an Event (on children too);
    # the operator posts its own decisions (Kube.event), kopf only warnings and errors
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.networking.request_timeout = 30
    settings.watching.server_timeout = 300
    logger.info("operator starting: peering %s, priority %d", cfg.peering_name, settings.peering.priority)


def _version_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    gen = meta.get("generation")
    return (
        f"g{gen}"
        if gen is not None and obj.get("kind") in ("Deployment", "PodDisruptionBudget")
        else f"r{meta.get('resourceVersion')}"
    )


@kopf.index("", "v1", "nodes")
async def nodes_index(body: kopf.Body, name: str, **_: Any) -> dict[str, dict[str, Any]]:
    """Nodes as the watch last saw them: placement reads this, never a fresh list."""
    return {name: {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}}


@kopf.index("", "v1", "pods", field="spec.nodeName")
async def pods_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]] | None:
    """Bound, non-terminated pods (what holds GPUs), from the watch."""
    if body.status.get("phase") in ("Succeeded", "Failed"):
        return None
    return {
        (namespace, name): {
            "metadata": dict(body.metadata),
            "spec": dict(body.spec),
            "status": {"phase": body.status.get("phase")},
        }
    }


def _values(index: kopf.Index[Any, Any]) -> list[dict[str, Any]]:
    return [value for key in list(index) for value in index.get(key, [])]


def _decide_rollout(
    memo: Any, owner: children.Owner, body: Mapping[str, Any], report: Mapping[str, Any] | None
) -> rollout.Outcome:
    kube: Kube = memo.kube
    meta = body["metadata"]
    cm = kube.get_config_map(owner.namespace, names.config_map_name(owner.name))
    baseline = rollout.read_baseline(cm) or memo.baselines.get((owner.namespace, owner.name))
    return rollout.decide(
        InferenceDeploymentSpec.model_validate(body["spec"]),
        baseline,
        rollout.state_of(body.get("status")),
        peers=[children.candidate_url(owner)],
        now=time.time(),
        report=report,
        action=(meta.get("annotations") or {}).get(rollout.ACTION_ANNOTATION),
        generation=meta.get("generation"),
    )


def _apply_candidate(
    memo: Any,
    owner: children.Owner,
    judged: rollout.Outcome,
    was_active: bool,
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
) -> tuple[bool, list[dict[str, Any]]]:
    """Apply (or remove) the candidate's children: whether all its replicas are ready, and conditions."""
    kube: Kube = memo.kube
    cand = children.Owner(owner.name, owner.namespace, owner.uid, candidate=True)
    generation = None  # the caller stamps its own
    if judged.candidate is None:
        keys = rollout.candidate_objects(owner.name)
        if was_active or any((owner.namespace, kind, name) in memo.applied for _, kind, name in keys):
            for api_version, kind, name in keys:
                memo.applied.pop((owner.namespace, kind, name), None)  # first: its DELETED event is no drift
                kube.delete(api_version, kind, owner.namespace, name)
        return False, []
    if len(names.peers_service_name(cand.instance)) > 63:  # a Service name is a DNS label
        message = f"a rollout needs a name of at most 47 characters; {owner.name!r} has {len(owner.name)}"
        return False, [status.condition(rollout.ROLLOUT_PROGRESSING, True, "NameTooLong", message, generation)]
    placed = place(cand, judged.candidate, nodes, pods)
    if isinstance(placed, Unplaceable):
        message = f"the candidate cannot be placed: {placed.message}"
        return False, [status.condition(rollout.ROLLOUT_PROGRESSING, True, "CandidateUnplaceable", message, generation)]
    ready = 0
    for obj in children.candidate_children(owner, judged.candidate, memo.cfg, placed.pod):
        applied = kube.apply(obj)
        memo.applied[(owner.namespace, obj["kind"], obj["metadata"]["name"])] = _version_of(applied)
        if obj["kind"] == "Deployment":
            ready = int((applied.get("status") or {}).get("readyReplicas") or 0)
    if ready < judged.candidate.replicas:
        message = f"{ready}/{judged.candidate.replicas} candidate replicas ready; traffic is split once all are"
        return False, [status.condition(rollout.ROLLOUT_PROGRESSING, True, "CandidateStarting", message, generation)]
    return True, []


def reconcile(
    memo: Any,
    body: Mapping[str, Any],
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    report: Mapping[str, Any] | None = None,
) -> Placed | Unplaceable:
    """Place and apply; runs in a worker thread (the Kubernetes client blocks). ``report``: the
    release gate's, from the rollout timer."""
    kube: Kube = memo.kube
    cfg: OperatorSettings = memo.cfg
    meta = body["metadata"]
    owner = children.Owner(meta["name"], meta["namespace"], meta["uid"])
    judged: rollout.Outcome | None = None
    was_active = False
    if rollout.involved(body.get("spec") or {}, body.get("status")):
        body = kube.get_cr(owner.namespace, owner.name) or body  # current status and annotations
        meta = body["metadata"]
        was_active = rollout.is_active(rollout.state_of(body.get("status")))
        judged = _decide_rollout(memo, owner, body, report)
    spec = judged.baseline if judged else InferenceDeploymentSpec.model_validate(body["spec"])
    generation = meta.get("generation")
    outcome = place(owner, spec, nodes, pods)
    if isinstance(outcome, Unplaceable):
        kube.write_status(
            owner.namespace, owner.name,
            {"observedGeneration": generation, "placement": {"summary": outcome.message}},
            [status.condition(status.PLACED, False, outcome.reason, outcome.message, generation)],
        )  # fmt: skip
        return outcome
    rollout_fields: dict[str, Any] = {}
    rollout_conditions: list[dict[str, Any]] = []
    plan = None
    if judged is not None:
        # the candidate first: the sidecars get the plan only once it can take traffic
        ready, extra = _apply_candidate(memo, owner, judged, was_active, nodes, pods)
        plan = judged.rollout_plan if ready else None
        if judged.status is not None or "rollout" in (body.get("status") or {}):
            rollout_fields["rollout"] = judged.status.to_wire() if judged.status else None
        rollout_conditions = [{**c, "observedGeneration": generation} for c in [*judged.conditions, *extra]]
        memo.baselines[(owner.namespace, owner.name)] = spec
    for obj in children.plan_children(owner, spec, cfg, outcome.pod, plan):
        applied = kube.apply(obj)
        memo.applied[(owner.namespace, obj["kind"], obj["metadata"]["name"])] = _version_of(applied)
    # Replica counts and Available/Progressing/Degraded come only from the
    # Deployment's own watch events (in order), never from this older view.
    kube.write_status(  # the handler's body is current: it saves a read
        owner.namespace, owner.name,
        {
            "observedGeneration": generation,
            "selector": f"{names.DEPLOYMENT_LABEL}={owner.name}",
            "endpoint": children.endpoint(owner, cfg),
            "placement": outcome.status.to_wire(),
            **rollout_fields,
        },
        [status.condition(status.PLACED, True, "Placed", outcome.status.summary, generation), *rollout_conditions],
        seen=body,
    )  # fmt: skip
    if judged is not None:
        for ev in judged.events:
            kube.event(body, ev.type, ev.reason, ev.message)
        if judged.handled_action is not None:
            kube.remove_annotation(owner.namespace, owner.name, rollout.ACTION_ANNOTATION, judged.handled_action)
    return outcome


async def _reconcile_and_report(
    body: kopf.Body, memo: Any, logger: kopf.Logger, nodes_index: kopf.Index[Any, Any], pods_index: kopf.Index[Any, Any]
) -> None:
    started = time.perf_counter()
    async with rollout.lock(memo, body["metadata"]["namespace"], body["metadata"]["name"]):
        outcome = await asyncio.to_thread(reconcile, memo, dict(body), _values(nodes_index), _values(pods_index))
    kube: Kube = memo.kube
    if isinstance(outcome, Unplaceable):
        await asyncio.to_thread(kube.event, body, "Warning", outcome.reason, outcome.message)
        raise kopf.TemporaryError(f"{outcome.reason}: {outcome.message}", delay=30)
    await asyncio.to_thread(kube.event, body, "Normal", "Placed", f"{outcome.status.summary}; children applied")
    logger.info("reconciled in %.0f ms", (time.perf_counter() - started) * 1000)


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
async def apply_deployment(
    body: kopf.Body,
    memo: Any,
    logger: kopf.Logger,
    **kw: Any,
) -> None:
    await _reconcile_and_report(body, memo, logger, kw["nodes_index"], kw["pods_index"])


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def delete_deployment(body: kopf.Body, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    meta = body["metadata"]
    kube: Kube = memo.kube
    deleted = await asyncio.to_thread(kube.delete_children, meta["namespace"], meta["name"])
    for key in [k for k in memo.applied if k[0] == meta["namespace"] and k[2].startswith(meta["name"])]:
        memo.applied.pop(key, None)
    memo.scrapes.pop((meta["namespace"], meta["name"]), None)
    logger.info("deleted %d children", deleted)


async def _child_event(
    event: kopf.RawEvent,
    memo: Any,
    logger: kopf.Logger,
    nodes_index: kopf.Index[Any, Any],
    pods_index: kopf.Index[Any, Any],
) -> None:
    obj = event["object"]
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    candidate_of = labels.get(names.CANDIDATE_OF_LABEL)  # a rollout's candidate child
    owner_name = candidate_of or labels.get(names.DEPLOYMENT_LABEL)
    namespace = meta.get("namespace")
    if not owner_name or not namespace or not hasattr(memo, "kube"):
        return
    kube: Kube = memo.kube
    key = (namespace, obj.get("kind"), meta.get("name"))
    known = memo.applied.get(key)
    # the operator forgets a candidate child before deleting it: only a known one's deletion is drift
    deleted = event["type"] == "DELETED" and (candidate_of is None or known is not None)
    drifted = deleted or (known is not None and known != _version_of(obj))
    if drifted:
        cr = await asyncio.to_thread(kube.get_cr, namespace, owner_name)
        if cr is None or (cr.get("metadata") or {}).get("deletionTimestamp"):
            return
        async with rollout.lock(memo, namespace, owner_name):
            # the watch may deliver an apply's own event before the applying thread recorded its version
            if event["type"] != "DELETED" and memo.applied.get(key) == _version_of(obj):
                return
            logger.warning(
                "%s %s/%s was changed outside the operator; restoring it", obj.get("kind"), namespace, meta.get("name")
            )
            outcome = await asyncio.to_thread(reconcile, memo, cr, _values(nodes_index), _values(pods_index))
        if isinstance(outcome, Placed):
            message = f"{obj.get('kind')} {meta.get('name')} was changed by hand; put back"
            await asyncio.to_thread(kube.event, cr, "Normal", "Restored", message)
        return
    if obj.get("kind") == "Deployment" and event["type"] != "DELETED" and candidate_of is None:

        def from_deployment(cr: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[dict[str, Any]]]:
            desired = int((cr.get("spec") or {}).get("replicas", 1))
            rollout, counts = status.rollout_conditions(desired, obj, (cr.get("metadata") or {}).get("generation"))
            return counts, rollout

        await asyncio.to_thread(kube.write_status, namespace, owner_name, from_deployment)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_FILTER)
async def deployment_event(
    event: kopf.RawEvent,
    memo: Any,
    logger: kopf.Logger,
    **kw: Any,
) -> None:
    await _child_event(event, memo, logger, kw["nodes_index"], kw["pods_index"])


@kopf.on.event("v1", "services", labels=CHILD_FILTER)
@kopf.on.event("v1", "configmaps", labels=CHILD_FILTER)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD_FILTER)
@kopf.on.event("v1", "serviceaccounts", labels=CHILD_FILTER)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_FILTER)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_FILTER)
async def other_child_event(
    event: kopf.RawEvent,
    memo: Any,
    logger: kopf.Logger,
    **kw: Any,
) -> None:
    await _child_event(event, memo, logger, kw["nodes_index"], kw["pods_index"])


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=5)
async def gather_metrics(
    stopped: kopf.DaemonStopped, meta: kopf.Meta, memo: Any, logger: kopf.Logger, **_: Any
) -> None:
    """Every metricsIntervalS, scrape each ready pod's engine /metrics into status.metrics."""
    cfg: OperatorSettings = memo.cfg
    if not cfg.metrics_enabled:
        return
    kube: Kube = memo.kube
    namespace, name = str(meta["namespace"]), str(meta["name"])
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        previous: dict[str, metrics_snapshot.Scrape] = {}
        last = time.monotonic()
        while not stopped:
            await stopped.wait(cfg.metrics_interval_s)
            if stopped:
                break
            pods = await asyncio.to_thread(kube.pods_of, namespace, name)
            current: dict[str, metrics_snapshot.Scrape] = {}
            for pod in pods:
                ip = (pod.get("status") or {}).get("podIP")
                if not ip:
                    continue
                url = cfg.metrics_url_template.format(
                    pod_ip=ip, port=names.ENGINE_PORT, pod_name=pod["metadata"]["name"], namespace=namespace
                )
                try:
                    async with session.get(url) as resp:
                        current[pod["metadata"]["name"]] = metrics_snapshot.parse(await resp.text())
                except (aiohttp.ClientError, TimeoutError):
                    logger.debug("metrics of pod %s unreachable", pod["metadata"]["name"])
            now = time.monotonic()
            snap = metrics_snapshot.snapshot(previous, current, now - last, status.now_rfc3339())
            previous, last = current, now
            await asyncio.to_thread(kube.write_status, namespace, name, {"metrics": snap.to_wire()}, [])


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=rollout.TICK_S)
async def judge_rollout(body: kopf.Body, memo: Any, logger: kopf.Logger, **kw: Any) -> None:
    """Every analysisIntervalSeconds of a running rollout: gather the baseline sidecars'
    observations, run the release gate, and act on its decision (``rollout.decide``)."""
    if not hasattr(memo, "kube") or body["metadata"].get("deletionTimestamp"):
        return
    state = rollout.state_of(body.get("status"))
    spec = body.get("spec") or {}
    if not rollout.is_active(state) or not spec.get("rollout") or state is None or not state.candidate_version:
        return
    namespace, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])
    interval = InferenceDeploymentSpec.model_validate(spec).rollout
    assert interval is not None
    last = memo.rollout_judged.get((namespace, name))
    if last is not None and time.monotonic() - last < interval.analysis_interval_seconds:
        return
    memo.rollout_judged[(namespace, name)] = time.monotonic()
    cfg: OperatorSettings = memo.cfg
    kube: Kube = memo.kube
    pods = await asyncio.to_thread(kube.pods_of, namespace, name)  # the baseline's (a candidate's have their own label)
    urls = rollout.observation_urls(pods, state.candidate_version, cfg.rollout_url_template)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.rollout_fetch_timeout_s)) as session:
        collected = await rollout.collect(urls, rollout.fetch_json(session))
    report = rollout.judge(interval, collected)
    logger.info(
        "rollout %s: gate says %s on %d matched requests (%d of %d sidecars answered)",
        state.candidate_version, report["decision"], report["metrics"]["matched"], collected.answered, len(urls),
    )  # fmt: skip
    async with rollout.lock(memo, namespace, name):
        await asyncio.to_thread(
            reconcile, memo, dict(body), _values(kw["nodes_index"]), _values(kw["pods_index"]), report
        )
