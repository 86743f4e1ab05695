"""The operator's Kubernetes I/O: server-side apply, reads, status writes.

Synchronous (the official client); handlers call it through a worker thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from modelfleet.dataplane.spec import API_GROUP, API_VERSION, PLURAL
from modelfleet.operator import status as st
from modelfleet.operator.resources import names

log = logging.getLogger(__name__)

CHILD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("policy/v1", "PodDisruptionBudget"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
)


class Kube:
    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        self.api = api
        self.field_manager = field_manager
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._dyn: dynamic.DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            if self._dyn is None:
                self._dyn = dynamic.DynamicClient(self.api)  # type: ignore[no-untyped-call]
            self._resources[key] = self._dyn.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager; conflicts are forced (we own these fields)."""
        meta = obj["metadata"]
        res = self._resource(obj["apiVersion"], obj["kind"])
        out = res.server_side_apply(
            body=dict(obj),
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=self.field_manager,
            force_conflicts=True,
        )
        result: dict[str, Any] = out.to_dict()
        return result

    def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on ``obj`` (shown by `kubectl describe`); failures are logged, not raised."""
        meta = obj["metadata"]
        now = st.now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
                "kind": obj.get("kind", "InferenceDeployment"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "reportingInstance": self.field_manager,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)  # type: ignore[arg-type]
        except ApiException as exc:
            log.warning("could not post event %s on %s: %s", reason, meta["name"], exc.reason)

    def ensure_peering(self, name: str, namespace: str | None) -> None:
        """Create kopf's peering object (cluster-wide, or in the watched namespace) unless it exists."""
        body = {"apiVersion": "kopf.dev/v1", "metadata": {"name": name}}
        try:
            if namespace is None:
                self.custom.create_cluster_custom_object(
                    "kopf.dev", "v1", "clusterkopfpeerings", {**body, "kind": "ClusterKopfPeering"}
                )
            else:
                self.custom.create_namespaced_custom_object(
                    "kopf.dev", "v1", namespace, "kopfpeerings", {**body, "kind": "KopfPeering"}
                )
        except ApiException as exc:
            if exc.status != 409:
                raise

    def delete_children(self, namespace: str, name: str) -> int:
        managed = f"app.kubernetes.io/managed-by={names.MANAGED_BY}"
        selectors = (f"{names.DEPLOYMENT_LABEL}={name},{managed}", f"{names.CANDIDATE_OF_LABEL}={name},{managed}")
        deleted = 0
        for api_version, kind in CHILD_KINDS:
            res = self._resource(api_version, kind)
            for selector in selectors:
                for item in res.get(namespace=namespace, label_selector=selector).items:
                    deleted += self.delete(api_version, kind, namespace, item.metadata.name)
        return deleted

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete one object (its dependents in the background); False when it was already gone."""
        try:
            self._resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )
            return True
        except ApiException as exc:
            if exc.status != 404:
                raise
            return False

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._raw(self.core.read_namespaced_config_map, name, namespace)
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def remove_annotation(self, namespace: str, name: str, key: str, value: str) -> None:
        """Remove ``key`` from the CR if it still says ``value`` (a JSON patch with a test: a value a
        person set meanwhile stays, to be acted on next)."""
        escaped = key.replace("~", "~0").replace("/", "~1")
        patch = [
            {"op": "test", "path": f"/metadata/annotations/{escaped}", "value": value},
            {"op": "remove", "path": f"/metadata/annotations/{escaped}"},
        ]
        try:
            self.custom.patch_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, patch, _content_type="application/json-patch+json"
            )
        except ApiException as exc:
            if exc.status not in (404, 409, 422):  # gone, or the annotation changed or went meanwhile
                raise

    def _raw(self, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        resp = call(*args, _preload_content=False, **kw)
        return json.loads(resp.data)

    def pods_of(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._raw(
            self.core.list_namespaced_pod, namespace, label_selector=f"{names.DEPLOYMENT_LABEL}={name}"
        )["items"]
        return items

    def get_cr(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._raw(
                self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
            )
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def write_status(
        self,
        namespace: str,
        name: str,
        fields: Mapping[str, Any] | Callable[[Mapping[str, Any]], tuple[Mapping[str, Any], list[dict[str, Any]]]],
        conditions: list[dict[str, Any]] | None = None,
        attempts: int = 5,
        seen: Mapping[str, Any] | None = None,
    ) -> bool:
        """Merge status fields and conditions into the CR, with optimistic concurrency.

        ``fields`` is either the fields to set, or a function of the current
        object returning ``(fields, conditions)``. One read per attempt: the
        write carries the read resourceVersion, and a conflict (another writer
        got there first) reads and merges again. Nothing is written when the
        status would not change. ``seen`` (the object as a watch last saw it)
        saves the first read.
        """
        for attempt in range(attempts):
            cr = dict(seen) if attempt == 0 and seen is not None else self.get_cr(namespace, name)
            if cr is None:
                return False
            new_fields, new_conditions = fields(cr) if callable(fields) else (fields, conditions or [])
            current = cr.get("status") or {}
            merged = st.merge_conditions(current.get("conditions") or [], new_conditions, st.now_rfc3339())
            new_status = {**current, **new_fields, "conditions": merged}
            new_status["phase"] = st.phase(merged).value
            if new_status == current:
                return True
            body = {"metadata": {"resourceVersion": cr["metadata"]["resourceVersion"]}, "status": new_status}
            try:
                self.custom.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, PLURAL, name, body)
                return True
            except ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    return False
                raise
        log.warning("status of %s/%s: gave up after %d conflicts", namespace, name, attempts)
        return False
