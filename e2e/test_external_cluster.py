"""`make e2e KUBECONFIG=...`: the external-cluster adapter drives a cluster it did not start."""

from __future__ import annotations

import json

import pytest

from e2e.cluster import ControlPlane
from e2e.external import ExternalCluster

pytestmark = pytest.mark.k8s


def test_external_cluster_adapter_against_a_separately_started_api_server(tmp_path):
    with ControlPlane() as other:
        ext = ExternalCluster(other.kubeconfig)
        ext.start()
        assert ext.server == other.server
        assert ext.version == other.version
        assert ext.ca_path.read_bytes() == other.ca_path.read_bytes()
        ext.kubectl("create", "namespace", "ext")
        ext.kubectl("create", "serviceaccount", "robot", "-n", "ext")
        token = ext.create_token("robot", "ext")
        kubeconfig = ext.write_kubeconfig_for_token(tmp_path / "robot.kubeconfig", token)
        who = json.loads(ext.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
        assert who["status"]["userInfo"]["username"] == "system:serviceaccount:ext:robot"
        ext.stop()  # leaves the cluster running
        assert json.loads(other.kubectl("get", "ns", "ext", "-o", "json").stdout)["metadata"]["name"] == "ext"
