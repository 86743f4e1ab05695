"""The committed CRD is exactly what `make crds` renders from dataplane/spec.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from modelfleet.operator.crd import render_crd, render_yaml

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / "inferencedeployments.modelfleet.io.yaml"
CHART_COPY = ROOT / "helm" / "modelfleet" / "crds" / COMMITTED.name


def test_committed_crd_matches_the_spec():
    assert COMMITTED.read_text() == render_yaml(), "crds/ is stale: run `make crds` and commit the result"


def test_chart_carries_the_same_crd():
    assert CHART_COPY.read_text() == COMMITTED.read_text(), "helm/modelfleet/crds is stale: run `make crds`"


def test_schema_is_structural_and_complete():
    crd = render_crd()
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def walk(node, path="spec"):
        assert "$ref" not in node and "anyOf" not in node and "const" not in node, path
        if node.get("type") != "object" or "properties" in node:
            assert "type" in node or "x-kubernetes-preserve-unknown-fields" in node, path
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{name} has no description"
            walk(sub, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(spec)
    assert spec["properties"]["runtime"]["properties"]["kind"]["enum"] == ["torch", "vllm", "sglang", "remote"]
    assert spec["properties"]["replicas"]["minimum"] == 0
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert crd["spec"]["names"]["shortNames"] == ["infd"]
    assert yaml.safe_load(render_yaml()) == crd
