"""Gateway API keys: the keys file (plaintext and hashed keys, bad files named by field),
the headers a key may come in, the per-key limiter on a fake clock, and CORS."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelfleet.dataplane.gateway.auth import (
    AuthConfig,
    GatewayAuth,
    KeyFileError,
    load_admin_token,
    load_keys,
    parse_keys,
    presented_key,
)
from modelfleet.dataplane.gateway.cors import CorsConfigError, CorsPolicy, install_cors
from modelfleet.dataplane.gateway.limits import (
    DEFAULT_COMPLETION_ESTIMATE,
    KeyLimiter,
    KeyLimits,
    Limit,
    estimate_tokens,
)
from modelfleet.dataplane.gateway.metrics import GatewayMetrics
from modelfleet.dataplane.gateway.routes import DeploymentRoute, RoutingTable
from modelfleet.dataplane.protocol import ApiError, ChatCompletionRequest

KEY_A = "sk-test-alpha-0123456789abcdef"
KEY_B = "sk-test-bravo-0123456789abcdef"


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------ the keys file


def test_plaintext_and_hashed_keys_load_to_the_same_digest(tmp_path: Path) -> None:
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(
        f"""
keys:
  - name: team-a
    key: {KEY_A}
    models: "*"
    requestsPerMinute: 60
    tokensPerMinute: 10000
    maxConcurrent: 4
  - name: team-b
    key: {sha(KEY_B)}
    models: [smollm2, qwen]
"""
    )
    a, b = load_keys(yaml_file)
    assert (a.name, a.models, a.limits) == ("team-a", None, KeyLimits(60, 10000, 4))
    assert a.digest == hashlib.sha256(KEY_A.encode()).digest()
    assert (b.name, b.models, b.limits) == ("team-b", frozenset({"smollm2", "qwen"}), KeyLimits())
    assert b.digest == hashlib.sha256(KEY_B.encode()).digest()
    assert KEY_A not in repr(a) and a.digest.hex() not in repr(a)  # the dataclass repr shows no secret

    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps({"keys": [{"name": "team-b", "key": KEY_B, "models": ["smollm2"]}]}))
    (b2,) = load_keys(json_file)
    assert b2.digest == b.digest


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"keys": [{"name": "a", "key": KEY_A, "models": "*", "requestPerMinute": 5}]}, "keys[0].requestPerMinute"),
        ({"keys": [{"name": "a", "key": KEY_A}]}, "keys[0].models"),
        ({"keys": [{"name": "a", "key": KEY_A, "models": "smollm2"}]}, "keys[0].models"),
        ({"keys": [{"name": "a", "key": KEY_A, "models": []}]}, "keys[0].models"),
        ({"keys": [{"name": "a", "key": "short", "models": "*"}]}, "keys[0].key"),
        ({"keys": [{"name": "a", "key": "sha256:abc", "models": "*"}]}, "keys[0].key"),
        ({"keys": [{"name": "a b", "key": KEY_A, "models": "*"}]}, "keys[0].name"),
        ({"keys": [{"name": "a", "key": KEY_A, "models": "*", "tokensPerMinute": 0}]}, "keys[0].tokensPerMinute"),
        ({"keys": [{"name": "a", "key": KEY_A, "models": "*", "maxConcurrent": "x"}]}, "keys[0].maxConcurrent"),
        (
            {"keys": [{"name": "a", "key": KEY_A, "models": "*"}, {"name": "a", "key": KEY_B, "models": "*"}]},
            "keys[1].name",
        ),
        (
            {"keys": [{"name": "a", "key": KEY_A, "models": "*"}, {"name": "b", "key": sha(KEY_A), "models": "*"}]},
            "keys[1].key",
        ),
        ({"key": []}, "key"),
        ([1, 2], "<file>"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_field_and_never_the_key(document: object, named: str) -> None:
    with pytest.raises(KeyFileError) as exc:
        parse_keys(document)
    message = str(exc.value)
    assert named in message, message
    assert KEY_A not in message and KEY_B not in message and hashlib.sha256(KEY_A.encode()).hexdigest() not in message


def test_unparsable_files_say_where_without_quoting_the_line(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "keys.yaml"
    bad_yaml.write_text(f"keys:\n  - name: a\n    key: {KEY_A}\n   models: [x\n")
    with pytest.raises(KeyFileError, match="line") as exc:
        load_keys(bad_yaml)
    assert KEY_A not in str(exc.value)
    bad_json = tmp_path / "keys.json"
    bad_json.write_text('{"keys": [{"name": "a", "key": "' + KEY_A + '",}]}')
    with pytest.raises(KeyFileError, match="not valid JSON") as exc:
        load_keys(bad_json)
    assert KEY_A not in str(exc.value)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_keys(tmp_path / "missing.yaml")


def test_admin_token_file(tmp_path: Path) -> None:
    token = tmp_path / "admin"
    token.write_text(KEY_A + "\n")
    assert load_admin_token(token) == hashlib.sha256(KEY_A.encode()).digest()
    token.write_text(sha(KEY_A))
    assert load_admin_token(token) == hashlib.sha256(KEY_A.encode()).digest()
    token.write_text("tiny")
    with pytest.raises(KeyFileError, match="admin token"):
        load_admin_token(token)


def test_the_admin_token_cannot_also_be_an_api_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys: [{{name: a, key: {KEY_A}, models: '*'}}]")
    admin = tmp_path / "admin"
    admin.write_text(KEY_A)
    with pytest.raises(KeyFileError, match="admin token"):
        GatewayAuth(AuthConfig(keys, admin), GatewayMetrics())


# ------------------------------------------------------------------ headers


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": f"Bearer {KEY_A}"}, KEY_A),
        ({"authorization": f"bearer   {KEY_A} "}, KEY_A),
        ({"api-key": KEY_A}, KEY_A),
        ({"x-api-key": KEY_A}, KEY_A),
        ({"authorization": f"Basic {KEY_B}", "x-api-key": KEY_A}, KEY_A),
        ({"authorization": f"Basic {KEY_B}"}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_the_key_comes_from_bearer_or_api_key_headers(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key


def _auth(tmp_path: Path, text: str, clock: FakeClock | None = None) -> GatewayAuth:
    keys = tmp_path / "keys.yaml"
    keys.write_text(text)
    return GatewayAuth(AuthConfig(keys, clock=clock or FakeClock()), GatewayMetrics())


TABLE = RoutingTable([DeploymentRoute(name="small", models=["smollm2-135m", "smollm2"], endpoints=[])])


def _chat(model: str, max_tokens: int | None = None) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens)


def test_authenticate_and_model_permission(tmp_path: Path) -> None:
    auth = _auth(tmp_path, f"keys: [{{name: a, key: {KEY_A}, models: [smollm2]}}]")
    with pytest.raises(ApiError) as missing:
        auth.authenticate({})
    assert (missing.value.status, missing.value.code) == (401, "invalid_api_key")
    with pytest.raises(ApiError) as wrong:
        auth.authenticate({"authorization": f"Bearer {KEY_B}"})
    assert (wrong.value.status, wrong.value.code) == (401, "invalid_api_key")
    assert KEY_B not in wrong.value.message
    key = auth.authenticate({"x-api-key": KEY_A})
    assert key.name == "a"
    auth.admit(key, _chat("smollm2"), 10, TABLE).release(200)
    auth.admit(key, _chat("smollm2-135m"), 10, TABLE).release(200)  # another name of the same deployment
    with pytest.raises(ApiError) as denied:
        auth.admit(key, _chat("llama-70b"), 10, TABLE)
    assert (denied.value.status, denied.value.code, denied.value.param) == (403, "model_not_allowed", "model")
    assert "llama-70b" in denied.value.message
    listing = {"object": "list", "data": [{"id": "smollm2-135m"}, {"id": "smollm2"}, {"id": "other"}]}
    assert [m["id"] for m in auth.visible_models(key, listing, TABLE)["data"]] == ["smollm2-135m", "smollm2"]


# ------------------------------------------------------------------ limiter


def test_requests_per_minute_is_a_bucket_that_refills() -> None:
    clock = FakeClock()
    limiter = KeyLimiter(KeyLimits(requests_per_minute=3), clock)
    for _ in range(3):
        assert limiter.acquire(1) is None
        limiter.release()
    refusal = limiter.acquire(1)
    assert refusal is not None and refusal.limit is Limit.REQUESTS and refusal.allowed == 3
    assert refusal.retry_after_s == pytest.approx(20.0)  # one request every 20 s
    assert refusal.retry_after_header() == "20"
    clock.advance(19.9)
    assert limiter.acquire(1) is not None
    clock.advance(0.2)
    assert limiter.acquire(1) is None


def test_tokens_are_charged_up_front_and_corrected_by_usage() -> None:
    clock = FakeClock()
    limiter = KeyLimiter(KeyLimits(tokens_per_minute=1000), clock)
    assert limiter.acquire(600) is None
    refusal = limiter.acquire(600)  # 400 left
    assert refusal is not None and refusal.limit is Limit.TOKENS
    assert refusal.retry_after_s == pytest.approx(200 / (1000 / 60))
    limiter.correct(600, 100)  # the answer used 100: 500 come back
    assert limiter.acquire(600) is None
    limiter.correct(600, 900)  # it used more than estimated: the level goes below what was charged
    assert limiter.tokens is not None and limiter.tokens.level == pytest.approx(0.0)
    # an estimate over the whole bucket needs a full bucket, not forever
    clock.advance(60)
    assert limiter.acquire(5000) is None
    assert limiter.tokens.level == pytest.approx(-4000)
    assert limiter.acquire(1) is not None


def test_concurrency_limit_frees_a_slot_on_release() -> None:
    limiter = KeyLimiter(KeyLimits(max_concurrent=2), FakeClock())
    assert limiter.acquire(1) is None and limiter.acquire(1) is None
    refusal = limiter.acquire(1)
    assert refusal is not None and refusal.limit is Limit.CONCURRENCY and refusal.retry_after_header() == "1"
    limiter.release()
    assert limiter.acquire(1) is None


def test_a_refused_request_is_not_charged() -> None:
    limiter = KeyLimiter(KeyLimits(requests_per_minute=10, tokens_per_minute=100), FakeClock())
    assert limiter.acquire(500) is None  # over the bucket: admitted on a full one
    assert limiter.acquire(10) is not None  # tokens refuse: the request bucket keeps its 9
    assert limiter.requests is not None and limiter.requests.level == pytest.approx(9)


def test_reloaded_limits_keep_what_was_used() -> None:
    clock = FakeClock()
    limiter = KeyLimiter(KeyLimits(requests_per_minute=10), clock)
    for _ in range(4):
        assert limiter.acquire(1) is None
    limiter.update(KeyLimits(requests_per_minute=5))
    assert limiter.requests is not None and limiter.requests.level == pytest.approx(1)
    limiter.update(KeyLimits())
    assert limiter.requests is None and limiter.acquire(1) is None


def test_token_estimate() -> None:
    assert estimate_tokens(400, 50, samples=True) == 101 + 50
    assert estimate_tokens(400, None, samples=True) == 101 + DEFAULT_COMPLETION_ESTIMATE
    assert estimate_tokens(400, None, samples=False) == 101


def test_grant_gives_back_the_estimate_of_a_failed_request(tmp_path: Path) -> None:
    clock = FakeClock()
    auth = _auth(tmp_path, f"keys: [{{name: a, key: {KEY_A}, models: '*', tokensPerMinute: 1000}}]", clock)
    key = auth.authenticate({"authorization": f"Bearer {KEY_A}"})
    grant = auth.admit(key, _chat("smollm2", max_tokens=500), 40, TABLE)
    bucket = auth._limiters["a"].tokens
    assert bucket is not None and bucket.level == pytest.approx(1000 - 511)
    grant.release(503)
    assert bucket.level == pytest.approx(1000)
    grant = auth.admit(key, _chat("smollm2", max_tokens=500), 40, TABLE)
    grant.usage(20, 30)
    grant.release(200)
    assert bucket.level == pytest.approx(950)


def test_rate_limit_error_names_the_limit(tmp_path: Path) -> None:
    auth = _auth(tmp_path, f"keys: [{{name: team-a, key: {KEY_A}, models: '*', maxConcurrent: 1}}]")
    key = auth.authenticate({"api-key": KEY_A})
    auth.admit(key, _chat("smollm2"), 10, TABLE)
    with pytest.raises(ApiError) as exc:
        auth.admit(key, _chat("smollm2"), 10, TABLE)
    assert (exc.value.status, exc.value.code) == (429, "rate_limit_exceeded")
    assert "concurrent requests" in exc.value.message and "team-a" in exc.value.message
    assert exc.value.headers["Retry-After"] == "1"


def test_reload_on_change_and_a_bad_file_keeps_the_old_keys(tmp_path: Path) -> None:
    auth = _auth(tmp_path, f"keys: [{{name: a, key: {KEY_A}, models: '*'}}]")
    path = auth.config.api_keys
    assert path is not None
    assert not auth.reload_if_changed()
    path.write_text(f"keys: [{{name: b, key: {KEY_B}, models: '*'}}]\n")
    assert auth.reload_if_changed()
    assert auth.authenticate({"api-key": KEY_B}).name == "b"
    with pytest.raises(ApiError):
        auth.authenticate({"api-key": KEY_A})
    path.write_text("keys: [{name: c}]\n")
    assert not auth.reload_if_changed()
    assert auth.names() == ["b"]


# ------------------------------------------------------------------ CORS


def test_cors_policy_refuses_a_wildcard_with_credentials() -> None:
    with pytest.raises(CorsConfigError, match="credentials"):
        CorsPolicy.of(["*"], allow_credentials=True)
    with pytest.raises(CorsConfigError):
        CorsPolicy.of([" "])
    assert CorsPolicy.of(["https://app.example/"]).allowed("https://app.example") == "https://app.example"


async def _cors_client(policy: CorsPolicy | None) -> TestClient:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hello)
    if policy is not None:
        install_cors(app, policy)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


async def test_cors_preflight_and_headers_for_an_allowed_origin() -> None:
    client = await _cors_client(CorsPolicy.of(["https://app.example"]))
    try:
        resp = await client.options("/v1/chat/completions", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "authorization" in resp.headers["Access-Control-Allow-Headers"]
        assert "x-api-key" in resp.headers["Access-Control-Allow-Headers"]
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "Access-Control-Allow-Credentials" not in resp.headers
        resp = await client.post("/v1/chat/completions", headers={"Origin": "https://app.example"})
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert resp.headers["Vary"] == "Origin"
        resp = await client.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers
        resp = await client.post("/v1/chat/completions", headers={"Origin": "https://evil.example"})
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    finally:
        await client.close()


async def test_cors_is_off_unless_configured() -> None:
    client = await _cors_client(None)
    try:
        resp = await client.options("/v1/chat/completions", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert resp.status == 405
        assert "Access-Control-Allow-Origin" not in resp.headers
        resp = await client.post("/v1/chat/completions", headers={"Origin": "https://app.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers
    finally:
        await client.close()


async def test_cors_wildcard_allows_any_origin_without_credentials() -> None:
    client = await _cors_client(CorsPolicy.of(["*"]))
    try:
        resp = await client.options("/v1/chat/completions", headers={"Origin": "https://any.example", **PREFLIGHT})
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
    finally:
        await client.close()
