"""The chart's gateway auth values: the keys and admin-token Secrets as volumes (never env),
the ServiceMonitor sending the admin token, CORS origins, the open-mode warning, and the
schema refusing typos in the new keys."""

from __future__ import annotations

import pytest

from tests.chart.test_chart import CHART, HELMS, by_kind, helm, kubernetes_validate, render

AUTH = [
    "gateway.auth.apiKeys.existingSecret=gateway-keys",
    "gateway.auth.apiKeys.secretKey=keys.json",
    "gateway.auth.adminToken.existingSecret=gateway-admin",
    "gateway.auth.reloadIntervalSeconds=2",
    "gateway.cors.allowedOrigins[0]=https://app.example",
    "metrics.serviceMonitor.enabled=true",
]


def _gateway(docs: list[dict]) -> tuple[dict, dict]:
    gw = by_kind(docs)[("Deployment", "mf-gateway")]
    pod = gw["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return pod, c


@pytest.mark.parametrize("name", HELMS)
def test_secrets_are_mounted_as_volumes_and_named_in_the_args(name: str) -> None:
    docs = render(AUTH, name=name)
    pod, c = _gateway(docs)
    assert c["args"] == [
        "gateway",
        "--kubernetes",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--api-keys",
        "/etc/modelfleet/api-keys/keys.json",
        "--admin-token",
        "/etc/modelfleet/admin-token/token",
        "--cors-origin",
        "https://app.example",
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": "gateway-keys", "defaultMode": 0o440}
    assert volumes["admin-token"]["secret"] == {"secretName": "gateway-admin", "defaultMode": 0o440}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # whole-Secret mounts: a subPath mount would never see a rotated Secret
    assert mounts["api-keys"] == {"name": "api-keys", "mountPath": "/etc/modelfleet/api-keys", "readOnly": True}
    assert (
        mounts["admin-token"]["mountPath"] == "/etc/modelfleet/admin-token" and "subPath" not in mounts["admin-token"]
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["MODELFLEET_AUTH_RELOAD_INTERVAL_S"]["value"] == "2"
    assert not any("valueFrom" in e for e in c["env"]), "no secret may reach the gateway as an env var"
    monitor = by_kind(docs)[("ServiceMonitor", "mf-gateway")]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "gateway-admin", "key": "token"}}


def test_rendered_objects_with_auth_validate_against_kubernetes() -> None:
    kv = kubernetes_validate()
    for doc in render(AUTH):
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            kv.validate(doc, "1.37.0", strict=True)


def test_defaults_mount_no_secret() -> None:
    pod, c = _gateway(render())
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert "--api-keys" not in c["args"] and "--admin-token" not in c["args"]


def _notes(*values: str) -> str:
    args = [arg for v in values for arg in ("--set", v)]
    res = helm("helm", "install", "mf", str(CHART), "--dry-run=client", "--namespace", "llm", *args)
    assert res.returncode == 0, res.stderr
    return res.stdout.split("NOTES:", 1)[1]


def test_notes_warn_loudly_when_the_gateway_runs_open() -> None:
    notes = _notes()
    assert "WARNING: THE GATEWAY RUNS OPEN" in notes and "gateway.auth.apiKeys.existingSecret" in notes
    notes = _notes(*AUTH)
    assert "RUNS OPEN" not in notes
    assert "API keys: from Secret gateway-keys" in notes
    assert 'api_key="<a key from Secret gateway-keys>"' in notes


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("gateway.auth.apiKey.existingSecret=x", ["apiKey"]),
        ("gateway.auth.apiKeys.existingsecret=x", ["existingsecret"]),
        ("gateway.auth.apiKeys.existingSecret=Not_A_Name", ["existingSecret"]),
        ("gateway.auth.reloadIntervalSeconds=0", ["reloadIntervalSeconds"]),
        ("gateway.cors.allowedOrigin[0]=https://a.example", ["allowedOrigin"]),
        ("gateway.cors.allowedOrigins[0]=app.example", ["allowedOrigins"]),
    ],
)
def test_the_schema_rejects_typos_in_the_auth_values(value: str, names: list[str]) -> None:
    res = helm("helm", "template", "mf", str(CHART), "--set", value)
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"helm template accepted --set {value}"
    assert "schema" in out
    for n in names:
        assert n in out, out
