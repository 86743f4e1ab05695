"""Run the e2e scenarios against a cluster of your own: `make e2e KUBECONFIG=...`.

``ExternalCluster`` gives the tests the same interface as the local
``ControlPlane`` (kubectl, apply, get_json, wait_for, tokens, kubeconfigs for a
ServiceAccount) but starts and stops nothing. The cluster must let the
kubeconfig's user install CRDs and RBAC, and must run kwok for the fake GPU
nodes the scenarios create (nodes annotated ``kwok.x-k8s.io/node: fake``);
without kwok those nodes never turn Ready and the tests that need them fail
saying so.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import IO, Any

import yaml

from e2e.cluster import ControlPlane


class ExternalCluster(ControlPlane):
    def __init__(self, kubeconfig: str | Path) -> None:
        super().__init__()
        self.external_kubeconfig = Path(kubeconfig).expanduser()

    def required_binaries(self) -> list[str]:
        return ["kubectl"]

    def start(self) -> ControlPlane:
        self._check_binaries()
        cfg: dict[str, Any] = yaml.safe_load(self.external_kubeconfig.read_text())
        context_name = cfg.get("current-context")
        context = next(c["context"] for c in cfg["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == context["cluster"])
        self.workdir = Path(tempfile.mkdtemp(prefix="modelfleet-external-"))
        (self.workdir / "logs").mkdir()
        self.kubeconfig = self.external_kubeconfig
        self.server = cluster["server"]
        self.ca_path = self.workdir / "ca.crt"
        if "certificate-authority-data" in cluster:
            self.ca_path.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        elif "certificate-authority" in cluster:
            self.ca_path.write_bytes(Path(cluster["certificate-authority"]).expanduser().read_bytes())
        else:
            raise RuntimeError(f"{self.external_kubeconfig}: the cluster entry has no CA; the tests need one")
        version = self.get_json_raw("version")
        self.version = version["serverVersion"]["gitVersion"]
        return self

    def get_json_raw(self, *args: str) -> Any:
        return yaml.safe_load(self.kubectl(*args, "-o", "json").stdout)

    def stop(self, timeout: float = 15.0) -> None:
        """Nothing to stop: the cluster is not ours."""

    def dump_logs(self, tail_lines: int = 80, file: IO[str] | None = None) -> str:
        text = self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout[-8000:]
        print(text, file=file)
        return text
