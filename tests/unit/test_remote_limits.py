"""The remote runner's pure parts: token buckets, spend windows, backoff, SSE normalisation, spec rules."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet.dataplane.runners.base import RunnerError
from modelfleet.dataplane.runners.limits import SpendLedger, TokenBucket
from modelfleet.dataplane.runners.openai_stream import estimate_tokens
from modelfleet.dataplane.runners.remote import backoff_s, read_credential
from modelfleet.dataplane.spec import InferenceDeploymentSpec, RemoteSpec


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_minutes_burst_then_waits_for_refill() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)  # one a second
    for _ in range(60):
        assert bucket.wait_s(1) == 0
        bucket.take(1)
    assert bucket.wait_s(1) == pytest.approx(1.0)
    clock.t = 0.5
    assert bucket.wait_s(1) == pytest.approx(0.5)
    clock.t = 1000  # refill is capped at the capacity
    assert bucket.level() == 60


def test_bucket_lets_an_oversized_request_through_once_full_and_charges_it() -> None:
    clock = Clock()
    bucket = TokenBucket(100, clock)
    assert bucket.wait_s(500) == 0  # more than a whole minute's allowance: waits only for a full bucket
    bucket.take(500)
    assert bucket.level() == -400
    assert bucket.wait_s(1) == pytest.approx(401 / (100 / 60))
    bucket.give_back(450)  # the usage came in lower than charged
    assert bucket.level() == 50


def test_ledger_refuses_once_the_hour_is_spent_and_resets_next_hour() -> None:
    clock = Clock(10 * 3600 + 100)
    ledger = SpendLedger(per_hour=1.0, per_day=None, clock=clock)
    ledger.add(0.6)
    assert ledger.refusal() is None
    ledger.add(0.6)  # the request that crosses the line is not cut off
    refusal = ledger.refusal()
    assert refusal is not None and refusal.window == "hour"
    assert refusal.spent_usd == pytest.approx(1.2) and refusal.resets_in_s == 3600 - 100 + 1
    clock.t = 11 * 3600
    assert ledger.refusal() is None and ledger.spent() == (0.0, pytest.approx(1.2))


def test_ledger_day_limit_outlasts_the_hour_and_survives_new_limits() -> None:
    clock = Clock(3 * 86400 + 5)
    ledger = SpendLedger(per_hour=10.0, per_day=2.0, clock=clock)
    ledger.add(2.5)
    clock.t += 3600
    refusal = ledger.refusal()
    assert refusal is not None and refusal.window == "day"
    relaxed = ledger.with_limits(per_hour=10.0, per_day=5.0)
    assert relaxed.refusal() is None and relaxed.spent()[1] == pytest.approx(2.5)


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    rng = random.Random(1)
    delays = [backoff_s(attempt, None, rng) for attempt in range(10)]
    assert all(0 <= d <= 8.0 for d in delays) and len(set(delays)) == 10
    assert backoff_s(0, "3", rng) >= 3.0
    assert backoff_s(0, "Wed, 21 Oct 2015 07:28:00 GMT", rng) <= 0.5  # a date form: the backoff alone


def _spec(**remote: Any) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "source": {"runtimeManaged": True}},
            "runtime": {"kind": "remote", "remote": {"baseUrl": "https://api.example.com/v1", **remote}},
        }
    )


def test_spec_rules_name_the_field() -> None:
    with pytest.raises(ValidationError, match="exactly one of secret, file, env"):
        _spec(apiKey={"file": "/k", "env": "K"})
    with pytest.raises(ValidationError, match="use apiKey for Authorization"):
        _spec(headers={"Authorization": "Bearer x"})
    with pytest.raises(ValidationError, match=r"runtime\.remote is required"):
        InferenceDeploymentSpec.model_validate(
            {"model": {"name": "m", "source": {"runtimeManaged": True}}, "runtime": {"kind": "remote"}}
        )
    with pytest.raises(ValidationError, match=r"baseUrl|base_url"):
        _spec(baseUrl="ftp://x")


def test_tier_spec_serves_the_models_names_from_the_tiers_api() -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "aliases": ["a"], "source": {"path": "/w"}},
            "replicas": 3,
            "spillover": {"tiers": [{"name": "hosted", "remote": {"baseUrl": "http://p/v1", "model": "big"}}]},
        }
    )
    tier = spec.for_tier("hosted")
    assert tier.runtime.remote is not None and tier.runtime.remote.model == "big"
    assert tier.served_names() == ["m", "a"] and tier.replicas == 1 and tier.spillover is None
    with pytest.raises(ValueError, match="no spill-over tier named 'other'"):
        spec.for_tier("other")
    with pytest.raises(ValidationError, match="reserved"):
        InferenceDeploymentSpec.model_validate(
            {
                "model": {"name": "m", "source": {"path": "/w"}},
                "spillover": {"tiers": [{"name": "local", "remote": {"baseUrl": "http://p/v1"}}]},
            }
        )


def test_credential_errors_name_the_field(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = RemoteSpec.model_validate({"baseUrl": "http://p/v1", "apiKey": {"file": str(tmp_path / "nope")}})
    with pytest.raises(RunnerError, match=r"runtime.remote.apiKey.file: cannot read"):
        read_credential(missing)
    monkeypatch.delenv("MF_TEST_KEY", raising=False)
    unset = RemoteSpec.model_validate({"baseUrl": "http://p/v1", "apiKey": {"env": "MF_TEST_KEY"}})
    with pytest.raises(RunnerError, match="MF_TEST_KEY is empty or unset"):
        read_credential(unset)
    monkeypatch.setenv("MF_TEST_KEY", " sk-1 \n")
    assert read_credential(unset) == "sk-1"


def test_token_estimate_is_about_four_characters_each() -> None:
    assert estimate_tokens("") == 1 and estimate_tokens("abcd" * 25) == 25


def test_secret_reference_reads_the_mounted_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = RemoteSpec.model_validate({"baseUrl": "http://p/v1", "apiKey": {"secret": {"name": "prov", "key": "token"}}})
    monkeypatch.setenv("MODELFLEET_SECRETS_DIR", str(tmp_path))
    with pytest.raises(RunnerError, match=r"apiKey\.secret: prov/token is not mounted"):
        read_credential(ref)
    (tmp_path / "prov").mkdir()
    (tmp_path / "prov" / "token").write_text("sk-mounted\n")
    assert read_credential(ref) == "sk-mounted"
