"""One settings model per process (pydantic-settings): environment variables
``MODELFLEET_*`` with command-line flags taking precedence."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelfleet.dataplane.spec import RoutingPolicyName


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "INFO"
    shutdown_timeout_s: float = Field(default=30.0, ge=0)


class EngineSettings(_Base):
    manifest: Path
    deployment: str | None = None
    replica: int = 0
    tier: str | None = None  # serve this spill-over tier of the deployment (spec.spillover) instead of the model
    fault_injection: bool = False  # MODELFLEET_FAULT_INJECTION=1: test-only POST /admin/fault (engine/faults.py)


class SidecarSettings(_Base):
    deployment: str
    peers: list[str]
    local_peer: str | None = None  # the engine in this sidecar's pod (new prefixes go there first)
    pod_ip: str | None = None  # MODELFLEET_POD_IP (downward API): in a cluster, the local peer is pod_ip:engine_port
    tiers: list[str] = []  # NAME=URL of the spill-over tiers' engines (spec.spillover)
    rollout_file: Path | None = None  # the rollout plan the controller writes (dataplane/rollout/plan.py)
    policy: RoutingPolicyName = RoutingPolicyName.LEAST_OUTSTANDING
    retry_budget: int = Field(default=2, ge=0, le=16)
    # cluster mode (sidecar/discovery.py): peers are the ready endpoints of this headless Service
    kubernetes: bool = False
    service: str | None = None
    namespace: str | None = None  # None: the pod's own namespace (its ServiceAccount mount)
    engine_port_name: str = "engine"  # the EndpointSlice port that is the engine's
    engine_port: int | None = Field(default=None, ge=1, le=65535)  # for slices without that port name
    discovery_interval_s: float = Field(default=5.0, gt=0)  # polling: without a watch, or while it fails
    discovery_watch_timeout_s: int = Field(default=300, ge=1)  # each EndpointSlice watch is renewed after this


class GatewaySettings(_Base):
    routes: Path | None = None  # a routing table file (local mode); None: InferenceDeployments in the cluster
    refresh_interval_s: float = Field(default=5.0, gt=0)
    # auth (docs/security.md): files, never the secrets themselves in the environment
    api_keys: Path | None = None  # the API keys file (YAML or JSON); None: the OpenAI routes are open
    admin_token: Path | None = None  # a file holding the token /metrics requires
    auth_reload_interval_s: float = Field(default=5.0, gt=0)  # how often both files are checked for changes
    cors_allowed_origins: list[str] = []  # browser origins allowed to call the gateway; empty: CORS off
    cors_allow_credentials: bool = False  # never with the "*" origin
