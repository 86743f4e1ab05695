"""Render the InferenceDeployment CRD from the pydantic spec (``make crds``).

pydantic's JSON Schema is turned into a Kubernetes structural schema:
``$ref``s are inlined, ``Optional[X]`` becomes ``X`` (absent means unset),
``const`` becomes a one-value ``enum``, JSON Schema 2020 exclusive bounds
become OpenAPI 3.0 ones, object-valued defaults become ``{}`` (the API server
then applies the nested defaults), and the cross-field rules the models check
in Python are restated as CEL ``x-kubernetes-validations`` so the API server
rejects the same manifests ``modelfleet up`` rejects.

    python -m modelfleet.operator.crd > crds/inferencedeployments.modelfleet.io.yaml
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from modelfleet.dataplane.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAME,
    InferenceDeploymentSpec,
    InferenceDeploymentStatus,
)

# CEL rules, keyed by the dotted path of the object they sit on ("" = spec root).
SPEC_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": "self.runtime.kind != 'torch' || !has(self.model.source.runtimeManaged) || !self.model.source.runtimeManaged",
            "message": "runtime torch needs a weight source (huggingFace, path or pythonPackage), not runtimeManaged",
            "fieldPath": ".model.source",
        },
        {
            "rule": "self.runtime.kind != 'remote' || (has(self.model.source.runtimeManaged) && self.model.source.runtimeManaged)",
            "message": "runtime remote serves a hosted model: set model.source.runtimeManaged: true",
            "fieldPath": ".model.source",
        },
        {
            "rule": "(self.runtime.kind == 'remote') == has(self.runtime.remote)",
            "message": "runtime.remote is required with runtime kind remote, and only with it",
            "fieldPath": ".runtime.remote",
        },
    ],
    "model": [
        {"rule": "self.mode == oldSelf.mode", "message": "model.mode is immutable: create a new deployment instead"},
        {
            "rule": "self.aliases.all(a, a != self.name)",
            "message": "aliases must differ from name",
            "fieldPath": ".aliases",
        },
    ],
    "model.source": [
        {
            "rule": "[has(self.huggingFace), has(self.path), has(self.pythonPackage), "
            "has(self.runtimeManaged) && self.runtimeManaged].filter(x, x).size() == 1",
            "message": "exactly one of huggingFace, path, pythonPackage, runtimeManaged must be set",
        }
    ],
    "placement": [
        {
            "rule": "!has(self.gpusPerReplica) || self.gpusPerReplica <= self.maxGpusPerReplica",
            "message": "gpusPerReplica must not exceed maxGpusPerReplica",
            "fieldPath": ".gpusPerReplica",
        }
    ],
}
SPEC_RULES["placement.tolerations[]"] = [
    {
        "rule": "self.operator == 'Exists' || (has(self.key) && self.key != '')",
        "message": "operator Equal needs a key (use operator Exists to tolerate every taint)",
    },
    {
        "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "message": "operator Exists takes no value",
    },
]
# Lists whose items must be unique.
SET_LISTS = {"model.aliases", "placement.gpuTypes"}

DROP_KEYS = {"title", "additionalProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Any], path: str, rules: dict[str, list[dict[str, str]]]) -> Any:
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, path, rules)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            merged = {**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}
            if merged.get("default", 0) is None:
                merged.pop("default")
            return _structural(merged, defs, path, rules)
        # a union of scalar types (none in the spec today): leave it to the API server as untyped
        return {"x-kubernetes-preserve-unknown-fields": True, "description": node.get("description", "")}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP_KEYS:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {
                name: _structural(sub, defs, f"{path}.{name}" if path else name, rules) for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = _structural(value, defs, f"{path}[]", rules)
        elif key == "default" and isinstance(value, dict):
            out["default"] = {}
        else:
            out[key] = value
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs, path, rules)
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if path in SET_LISTS:
        out["x-kubernetes-list-type"] = "set"
    if path in rules:
        out["x-kubernetes-validations"] = rules[path]
    return out


def openapi_schema(model: type[BaseModel], rules: dict[str, list[dict[str, str]]] | None = None) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    schema = _structural(raw, raw.get("$defs", {}), "", rules or {})
    assert isinstance(schema, dict)
    return schema


def render_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(InferenceDeploymentSpec, SPEC_RULES)
    status_schema = openapi_schema(InferenceDeploymentStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "modelfleet"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A model served by ModelFleet: weights, runtime, replicas, limits and placement.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {
                                    "rule": "self.metadata.name.size() <= 52",
                                    "message": "metadata.name must be at most 52 characters (child objects add suffixes)",
                                }
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
                        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime.kind"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
                        {
                            "name": "GPUs",
                            "type": "integer",
                            "description": "GPUs per replica",
                            "jsonPath": ".status.placement.gpusPerReplica",
                        },
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {
                            "name": "Rollout",
                            "type": "string",
                            "description": "Canary, Shadow, Promoted or RolledBack: the latest judged rollout",
                            "jsonPath": ".status.rollout.phase",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from dataplane/spec.py. Do not edit by hand.\n"


def render_yaml() -> str:
    return HEADER + yaml.safe_dump(render_crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
