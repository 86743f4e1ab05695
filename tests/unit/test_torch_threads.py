"""The torch runner's CPU thread plan (no model needed: the plan is read before any weights load)."""

from __future__ import annotations

import os

import pytest

from modelfleet.dataplane.runners.torch import TorchRunner


def test_torch_thread_plan_honours_explicit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several engines on one machine must each stay within their share of the cores."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert TorchRunner()._thread_plan() == (max(1, cores - 1), cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert TorchRunner()._thread_plan() == (1, 1)
    assert TorchRunner(cpu_threads=3)._thread_plan() == (3, 3)  # the spec wins over the environment
