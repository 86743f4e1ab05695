"""Read InferenceDeployment manifests from ordinary Kubernetes YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modelfleet.dataplane.spec import InferenceDeployment, describe_location


class ManifestError(ValueError):
    """A manifest that cannot be used, with the offending field named."""


def parse_manifest(doc: Any, source: str = "<manifest>") -> InferenceDeployment:
    """Validate one decoded YAML document as an InferenceDeployment."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: expected a mapping, got {type(doc).__name__}")
    try:
        return InferenceDeployment.model_validate(doc)
    except ValidationError as exc:
        lines = [
            f"{describe_location(tuple(err['loc'])) or '<root>'}: {err['msg']}" for err in exc.errors(include_url=False)
        ]
        raise ManifestError(f"{source}: invalid InferenceDeployment\n  " + "\n  ".join(lines)) from None


def load_manifests(path: Path) -> list[InferenceDeployment]:
    """Every InferenceDeployment in a (possibly multi-document) YAML file.

    Other kinds in the same file (Namespaces, Secrets, ...) are ignored, so the
    file a cluster user applies also runs locally.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    found = [
        parse_manifest(doc, f"{path} (document {i + 1})")
        for i, doc in enumerate(docs)
        if isinstance(doc, dict) and doc.get("kind") == "InferenceDeployment"
    ]
    if not found:
        raise ManifestError(f"{path}: no InferenceDeployment found")
    names = [d.metadata.name for d in found]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: duplicate InferenceDeployment names {sorted(names)}")
    served: dict[str, str] = {}
    for dep in found:
        for model_id in dep.spec.served_names():
            if model_id in served:
                raise ManifestError(
                    f"{path}: model id {model_id!r} is served by both {served[model_id]!r} and {dep.metadata.name!r}"
                )
            served[model_id] = dep.metadata.name
    return found
