"""Every setting of the operator process, in one place (MODELFLEET_OPERATOR_* env vars)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

VERSION = "0.1.0"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_OPERATOR_", extra="ignore")

    namespace: str | None = Field(default=None, description="Watch one namespace; default: all namespaces")
    image_registry: str = Field(default="ghcr.io/modelfleet", description="Registry prefix of the data-plane images")
    image_tag: str = Field(default=VERSION, description="Tag of the data-plane images")
    image_pull_policy: str = "IfNotPresent"
    peering_name: str = Field(default="modelfleet", description="kopf peering object shared by operator replicas")
    priority: int | None = Field(
        default=None, description="Peering priority; default: random, so exactly one replica acts"
    )
    status_interval_s: float = Field(
        default=5.0, gt=0, description="How often children's state is folded into CR status"
    )
    metrics_interval_s: float = Field(
        default=30.0, ge=0, description="How often pods' /metrics are gathered; 0 turns it off"
    )
    metrics_url_template: str = Field(
        default="http://{pod_ip}:{port}/metrics",
        description="Where a pod's engine metrics are read; fields: pod_ip, port, pod_name, namespace",
    )
    rollout_url_template: str = Field(
        default="http://{pod_ip}:{port}/rollout/observations?id={rollout_id}",
        description="Where a baseline sidecar's rollout observations are read; fields: pod_ip, port, pod_name, "
        "namespace, rollout_id",
    )
    rollout_fetch_timeout_s: float = Field(
        default=3.0, gt=0, description="Per-sidecar limit on reading rollout observations; a miss is missing evidence"
    )
    cluster_domain: str = "cluster.local"
    field_manager: str = "modelfleet-operator"
    health_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of /healthz (kopf liveness); 0 turns it off"
    )

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_interval_s > 0
