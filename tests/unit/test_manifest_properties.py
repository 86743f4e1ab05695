"""Property tests of manifest parsing (dataplane/manifest.py over dataplane/spec.py), issue #9 item 5.

Generated valid manifests load and round-trip through their wire form and
through YAML; mutated ones (a value of the wrong type or out of range, an
unknown key, a required key removed) either still load or raise
``ManifestError`` naming the mutated field or one of its parents, never
another exception type. Random YAML text never raises anything but
``ManifestError``.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfleet.dataplane.manifest import ManifestError, load_manifests, parse_manifest
from modelfleet.dataplane.spec import (
    Device,
    DType,
    InferenceDeployment,
    InferenceDeploymentSpec,
    Mode,
    Quantization,
    RoutingPolicyName,
)

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

model_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:/-]{0,40}\Z")
dns_labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?\Z")
sources = st.one_of(
    st.builds(lambda p: {"path": p}, st.text(min_size=1, max_size=40)),
    st.builds(
        lambda pkg, f: {"pythonPackage": {"package": pkg, "file": f}},
        st.text(min_size=1, max_size=20),
        st.text(min_size=1, max_size=20),
    ),
    st.builds(lambda r: {"huggingFace": {"repo": r}}, st.text(min_size=1, max_size=40)),
)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@st.composite
def valid_manifests(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(model_ids)
    aliases = draw(st.lists(model_ids.filter(lambda a: a != name), max_size=4, unique=True))
    model = {
        "name": name,
        "aliases": aliases,
        "source": draw(sources),
        "dtype": draw(st.sampled_from([d.value for d in DType])),
        "quantization": draw(st.sampled_from([q.value for q in Quantization])),
        "mode": draw(st.sampled_from([m.value for m in Mode])),
    }
    engine = _drop_none(
        {
            "maxModelLen": draw(st.integers(16, 1_048_576)),
            "maxNumSeqs": draw(st.integers(1, 4096)),
            "kvBlockSize": draw(st.integers(1, 1024)),
            "numKvBlocks": draw(st.none() | st.integers(1, 10_000_000)),
            "maxQueueLen": draw(st.integers(0, 1_000_000)),
            "prefixCaching": draw(st.booleans()),
        }
    )
    routing = {
        "policy": draw(st.sampled_from([p.value for p in RoutingPolicyName])),
        "prefixChars": draw(st.integers(1, 1_048_576)),
        "loadBound": draw(st.floats(1.0, 100.0)),
    }
    runtime = _drop_none(
        {
            "kind": "torch",
            "device": draw(st.sampled_from([d.value for d in Device])),
            "cpuThreads": draw(st.none() | st.integers(1, 1024)),
        }
    )
    spec = {
        "model": model,
        "runtime": runtime,
        "replicas": draw(st.integers(0, 1024)),
        "engine": engine,
        "routing": routing,
    }
    metadata = _drop_none(
        {"name": draw(dns_labels.filter(lambda n: len(n) <= 52)), "namespace": draw(st.none() | dns_labels)}
    )
    return {"apiVersion": "modelfleet.io/v1alpha1", "kind": "InferenceDeployment", "metadata": metadata, "spec": spec}


def _path(parts: tuple[Any, ...]) -> str:
    """The same notation ManifestError uses (spec.engine.maxModelLen, spec.model.aliases[0])."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


def _locations(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in the document (mappings and list items)."""
    out: list[tuple[Any, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_locations(value, (*prefix, key)))
    return out


def _parent_and_key(doc: dict[str, Any], loc: tuple[Any, ...]) -> tuple[Any, Any]:
    node: Any = doc
    for key in loc[:-1]:
        node = node[key]
    return node, loc[-1]


wrong_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def named_paths(error: ManifestError) -> list[str]:
    """The field paths a ManifestError names, one per line after its first."""
    lines = str(error).splitlines()[1:]
    return [m.group(1) for line in lines if (m := re.match(r"\s+(\S+?): ", line))]


@SETTINGS
@given(valid_manifests())
def test_valid_manifests_round_trip(doc: dict[str, Any]) -> None:
    dep = parse_manifest(doc)
    assert dep.spec.model.name == doc["spec"]["model"]["name"]
    assert dep.spec.replicas == doc["spec"]["replicas"]
    # the wire form (what the operator renders into the ConfigMap) parses back to the same spec
    assert InferenceDeploymentSpec.model_validate(dep.spec.to_wire()) == dep.spec
    # and so does the whole object through YAML
    wire = dep.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert InferenceDeployment.model_validate(yaml.safe_load(yaml.safe_dump(wire))) == dep


@SETTINGS
@given(valid_manifests(), st.data())
def test_mutated_manifests_fail_only_with_a_named_field(doc: dict[str, Any], data: st.DataObject) -> None:
    mutated = copy.deepcopy(doc)
    loc = data.draw(st.sampled_from(_locations(doc)), label="location")
    parent, key = _parent_and_key(mutated, loc)
    how = data.draw(st.sampled_from(["replace", "delete", "unknown_key"]), label="mutation")
    if how == "replace":
        parent[key] = data.draw(wrong_values, label="value")
    elif how == "delete":
        del parent[key]
    else:
        if not isinstance(parent, dict) or loc[0] == "metadata":  # metadata ignores unknown keys, as Kubernetes
            return
        parent["zzUnknown"] = 1
        loc = (*loc[:-1], "zzUnknown")
    try:
        parse_manifest(mutated)
    except ManifestError as err:
        named = named_paths(err)
        assert named, str(err)
        wanted = _path(loc)
        # the mutated field, a parent (whole-object rules such as "exactly one source"), or a child of it
        assert any(
            wanted == p or wanted.startswith((p + ".", p + "[")) or p.startswith((wanted + ".", wanted + "["))
            for p in named
        ), f"mutated {wanted} ({how}); the error names {named}:\n{err}"


@SETTINGS
@given(st.text(max_size=300))
def test_any_yaml_text_fails_only_with_manifest_error(tmp_path_factory: Any, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("m")) / "m.yaml"
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(ManifestError):
        load_manifests(path)


@SETTINGS
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=10), c),
        max_leaves=20,
    )
)
def test_any_document_fails_only_with_manifest_error(doc: Any) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(doc)
