"""API keys and the admin token of the gateway (docs/security.md, "Gateway API keys").

The keys file (YAML or JSON) lists named keys, each with the models it may use
and its limits (gateway/limits.py). A key is written in plaintext or as
``sha256:<64 hex digits>``; either way only its SHA-256 digest is kept in
memory. A request's key is hashed once and looked up by digest, then compared
with ``hmac.compare_digest``: one hash and one dict lookup per request, no
file access. The file is polled (its mtime, size and inode, every few seconds)
and reloaded when it changes, as a rotated Kubernetes Secret does; a file that
fails to load leaves the previous keys in force.

Nothing here logs, counts or answers with key material: a key is named by its
``name`` from the file, and error messages name fields and positions, never
values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from modelfleet.dataplane.gateway.limits import Clock, KeyLimiter, KeyLimits, Limit, Refusal, estimate_tokens
from modelfleet.dataplane.gateway.metrics import GatewayMetrics
from modelfleet.dataplane.gateway.routes import RoutingTable
from modelfleet.dataplane.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ForwardedGeneration

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
HASH_RE = re.compile(r"sha256:[0-9a-fA-F]{64}")
MIN_KEY_CHARS = 16  # a plaintext key (or admin token) shorter than this is refused: too easy to guess
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
ALL_MODELS = "*"
NO_KEY = "none"  # the key label of a refusal before a key is known


class KeyFileError(ValueError):
    """The keys file or the admin token file cannot be used; the message names the field, never a value."""


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def secret_digest(value: str) -> bytes:
    """A key as written in a file, plaintext or ``sha256:<hex>``, to its digest."""
    if value.startswith(HASH_PREFIX):
        return bytes.fromhex(value[len(HASH_PREFIX) :])
    return digest(value)


def _check_secret(value: str) -> str:
    if value.startswith(HASH_PREFIX):
        if not HASH_RE.fullmatch(value):
            raise ValueError("a hashed key is 'sha256:' followed by 64 hex digits")
    elif len(value) < MIN_KEY_CHARS:
        raise ValueError(f"a plaintext key needs at least {MIN_KEY_CHARS} characters")
    elif value != value.strip():
        raise ValueError("a key must not start or end with whitespace")
    return value


def _models(value: Any) -> Any:
    if isinstance(value, str):
        if value == ALL_MODELS:
            return [ALL_MODELS]
        raise ValueError('models is a list of model ids, or "*" for every model')
    return value


class KeyEntry(BaseModel):
    """One key of the keys file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False, hide_input_in_errors=True)

    name: Annotated[str, Field(pattern=NAME_RE, description="Names the key in metrics and logs (not secret).")]
    key: Annotated[str, Field(description="The key in plaintext, or sha256:<64 hex digits> of it.")]
    models: Annotated[list[str], BeforeValidator(_models), Field(min_length=1)]
    requests_per_minute: Annotated[int | None, Field(ge=1, alias="requestsPerMinute")] = None
    tokens_per_minute: Annotated[int | None, Field(ge=1, alias="tokensPerMinute")] = None
    max_concurrent: Annotated[int | None, Field(ge=1, alias="maxConcurrent")] = None

    @field_validator("key")
    @classmethod
    def _secret(cls, v: str) -> str:
        return _check_secret(v)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    keys: list[KeyEntry]


@dataclass(frozen=True)
class ApiKey:
    """A loaded key: its digest, never the key."""

    name: str
    digest: bytes = field(repr=False)
    models: frozenset[str] | None  # None: every model
    limits: KeyLimits


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<file>"


def _read_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read it ({type(exc).__name__})") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyFileError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # never str(exc): PyYAML quotes the offending line, which may hold a key
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise KeyFileError(
            f"{path}: not valid YAML: {getattr(exc, 'problem', None) or 'syntax error'}{where}"
        ) from None


def parse_keys(document: Any, source: str = "keys file") -> list[ApiKey]:
    """The keys of a parsed keys file; KeyFileError names the first bad field."""
    try:
        parsed = KeysFile.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        raise KeyFileError(f"{source}: {_location(first['loc'])}: {first['msg']}") from None
    keys: list[ApiKey] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for i, entry in enumerate(parsed.keys):
        if entry.name in names:
            raise KeyFileError(
                f"{source}: keys[{i}].name: {entry.name!r} is already the name of keys[{names[entry.name]}]"
            )
        secret = secret_digest(entry.key)
        if secret in digests:
            raise KeyFileError(f"{source}: keys[{i}].key: the same key as keys[{digests[secret]}]")
        names[entry.name] = digests[secret] = i
        models = None if ALL_MODELS in entry.models else frozenset(entry.models)
        limits = KeyLimits(entry.requests_per_minute, entry.tokens_per_minute, entry.max_concurrent)
        keys.append(ApiKey(entry.name, secret, models, limits))
    return keys


def load_keys(path: Path) -> list[ApiKey]:
    return parse_keys(_read_document(path), str(path))


def load_admin_token(path: Path) -> bytes:
    """The admin token file: one line, the token in plaintext or ``sha256:<hex>``; its digest."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read it ({type(exc).__name__})") from None
    try:
        return secret_digest(_check_secret(value))
    except ValueError as exc:
        raise KeyFileError(f"{path}: admin token: {exc}") from None


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The client's key: ``Authorization: Bearer <key>``, else ``api-key``, else ``x-api-key``."""
    return bearer_token(headers) or headers.get("api-key") or headers.get("x-api-key") or None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


LIMIT_WORDS = {
    Limit.REQUESTS: ("requests per minute", "requests"),
    Limit.TOKENS: ("tokens per minute", "tokens"),
    Limit.CONCURRENCY: ("concurrent requests", "requests"),
}


def rate_limited(key: ApiKey, refusal: Refusal) -> ApiError:
    what, kind = LIMIT_WORDS[refusal.limit]
    retry = refusal.retry_after_header()
    return ApiError(
        429,
        f"Rate limit exceeded for API key '{key.name}': {what} (limit {refusal.allowed}). Retry after {retry} s.",
        type=kind,
        code="rate_limit_exceeded",
        headers={"Retry-After": retry},
    )


@dataclass(frozen=True)
class AuthConfig:
    """Where the gateway's secrets are; ``api_keys`` None: the OpenAI routes are open."""

    api_keys: Path | None = None
    admin_token: Path | None = None
    reload_interval_s: float = 5.0
    clock: Clock = time.monotonic


class Grant:
    """One admitted request of a key: settles its tokens and releases its concurrency slot."""

    __slots__ = ("charged", "key", "limiter", "metrics", "used")

    def __init__(self, key: ApiKey, limiter: KeyLimiter, charged: int, metrics: GatewayMetrics) -> None:
        self.key = key
        self.limiter = limiter
        self.charged = charged
        self.metrics = metrics
        self.used = False

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The answer's usage: count it, and correct the up-front charge."""
        self.used = True
        self.metrics.key_prompt_tokens.labels(self.key.name).inc(prompt_tokens)
        self.metrics.key_completion_tokens.labels(self.key.name).inc(completion_tokens)
        self.limiter.correct(self.charged, prompt_tokens + completion_tokens)

    def release(self, status: int | None) -> None:
        """The request is over; ``status`` None: the client left before the answer was sent."""
        self.limiter.release()
        if not self.used and status is not None and status >= 400:
            self.limiter.correct(self.charged, 0)  # an error generated nothing: give the estimate back
        self.metrics.key_requests.labels(self.key.name, str(status) if status is not None else "499").inc()


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a Secret volume swaps its ..data link on rotation
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class GatewayAuth:
    """The gateway's keys, limiters and admin token, reloaded when their files change."""

    def __init__(self, config: AuthConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.enforcing = config.api_keys is not None
        self._keys: dict[bytes, ApiKey] = {}
        self._limiters: dict[str, KeyLimiter] = {}
        self._admin: bytes | None = None
        self._seen: tuple[object, object] = (None, None)
        self.reload()  # the first load raises KeyFileError: a bad file stops the gateway from starting

    # ------------------------------------------------------------ loading

    def reload(self) -> None:
        """Load both files now (KeyFileError when one is bad; nothing changes then)."""
        seen = (self._file_signature(self.config.api_keys), self._file_signature(self.config.admin_token))
        keys = load_keys(self.config.api_keys) if self.config.api_keys is not None else []
        admin = load_admin_token(self.config.admin_token) if self.config.admin_token is not None else None
        for i, key in enumerate(keys):
            if admin is not None and hmac.compare_digest(key.digest, admin):
                raise KeyFileError(f"keys[{i}] ({key.name}) is the admin token; use different secrets")
        limiters = {}
        for key in keys:
            limiter = self._limiters.get(key.name)
            if limiter is None:
                limiter = KeyLimiter(key.limits, self.config.clock)
            else:
                limiter.update(key.limits)
            limiters[key.name] = limiter
        self._keys = {key.digest: key for key in keys}
        self._limiters = limiters
        self._admin = admin
        self._seen = seen
        if self.config.api_keys is not None:
            names = ", ".join(k.name for k in keys) or "none"
            log.info("API keys from %s: %d key(s): %s", self.config.api_keys, len(keys), names)

    @staticmethod
    def _file_signature(path: Path | None) -> object:
        return _signature(path) if path is not None else None

    def reload_if_changed(self) -> bool:
        """Reload when a file's mtime, size or inode changed; a bad file is logged and the old keys stay."""
        seen = (self._file_signature(self.config.api_keys), self._file_signature(self.config.admin_token))
        if seen == self._seen:
            return False
        try:
            self.reload()
        except KeyFileError as exc:
            self._seen = seen  # retried at its next change, not logged at every poll
            log.error("not reloading the gateway's keys, the previous ones stay in force: %s", exc)
            return False
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            self.reload_if_changed()

    async def watching(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the reload poll runs while the app does."""
        task = asyncio.create_task(self.watch())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # ------------------------------------------------------ request path

    def names(self) -> list[str]:
        return [k.name for k in self._keys.values()]

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        """The key a request presents; 401 when missing or unknown."""
        presented = presented_key(headers)
        if presented is None:
            self.metrics.auth_refused.labels("missing_key", NO_KEY).inc()
            raise _unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>' (or an 'api-key' or 'x-api-key' header).",
                "invalid_api_key",
            )
        secret = digest(presented)
        key = self._keys.get(secret)
        if key is None or not hmac.compare_digest(key.digest, secret):
            self.metrics.auth_refused.labels("invalid_key", NO_KEY).inc()
            raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
        return key

    def allows(self, key: ApiKey, model: str, table: RoutingTable) -> bool:
        """The key may use ``model``: it is listed, or another name of the same deployment is."""
        if key.models is None or model in key.models:
            return True
        try:
            route = table.lookup(model)
        except ApiError:
            return False
        return not key.models.isdisjoint(route.models)

    def admit(self, key: ApiKey, req: Any, body_bytes: int, table: RoutingTable) -> Grant:
        """403 when the key may not use the model, 429 when a limit refuses; else the request's grant."""
        model: str = req.model
        if not self.allows(key, model, table):
            self.metrics.auth_refused.labels("model_not_allowed", key.name).inc()
            raise ApiError(
                403,
                f"The API key '{key.name}' may not use the model '{model}'.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        samples = isinstance(req, ChatCompletionRequest | CompletionRequest | ForwardedGeneration)
        cost = estimate_tokens(body_bytes, req.token_limit() if samples else None, samples)
        limiter = self._limiters[key.name]
        refusal = limiter.acquire(cost)
        if refusal is not None:
            self.metrics.auth_refused.labels(refusal.limit.value, key.name).inc()
            raise rate_limited(key, refusal)
        return Grant(key, limiter, cost, self.metrics)

    def visible_models(self, key: ApiKey, listing: dict[str, Any], table: RoutingTable) -> dict[str, Any]:
        """/v1/models as this key sees it: only the models it may use."""
        if key.models is None:
            return listing
        return listing | {"data": [m for m in listing["data"] if self.allows(key, m["id"], table)]}

    def check_admin(self, headers: Mapping[str, str]) -> None:
        """/metrics: only the admin token (never an API key); 401 without it, 403 when none is configured."""
        if self._admin is None:
            if not self.enforcing:
                return  # an open gateway without an admin token: metrics are open too
            self.metrics.auth_refused.labels("admin_not_configured", NO_KEY).inc()
            raise ApiError(
                403,
                "Metrics need the admin token, and the gateway has none: start it with --admin-token FILE.",
                type="permission_error",
                code="admin_token_not_configured",
            )
        token = bearer_token(headers)
        if token is None or not hmac.compare_digest(digest(token), self._admin):
            self.metrics.auth_refused.labels("invalid_admin_token", NO_KEY).inc()
            raise _unauthorized(
                "This endpoint needs the admin token: 'Authorization: Bearer <token>'.", "invalid_admin_token"
            )
