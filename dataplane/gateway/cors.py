"""CORS for the gateway: off unless origins are configured (docs/security.md).

A browser's preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is
answered here, before routing and before authentication (a preflight carries
no key). Every other response to an allowed ``Origin`` gets
``Access-Control-Allow-Origin`` through ``on_response_prepare``, so streamed
answers carry it too. ``*`` allows any origin and is refused together with
credentials; an API key sent in a header needs no credentials mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from modelfleet.dataplane.httpserver import Handler, api_error_response
from modelfleet.dataplane.protocol import ApiError

ANY_ORIGIN = "*"
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "authorization, api-key, x-api-key, content-type, x-request-id, x-modelfleet-priority"
EXPOSE_HEADERS = "retry-after, x-request-id"


class CorsConfigError(ValueError):
    """The CORS settings contradict each other."""


@dataclass(frozen=True)
class CorsPolicy:
    origins: frozenset[str]
    allow_credentials: bool = False
    max_age_s: int = 600

    @classmethod
    def of(cls, origins: Iterable[str], allow_credentials: bool = False) -> CorsPolicy:
        cleaned = frozenset(o.strip().rstrip("/") for o in origins if o.strip())
        if not cleaned:
            raise CorsConfigError("CORS needs at least one allowed origin")
        if ANY_ORIGIN in cleaned and allow_credentials:
            raise CorsConfigError("CORS: the '*' origin cannot be combined with credentials; list the origins")
        return cls(cleaned, allow_credentials)

    def allowed(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin value for this origin, or None."""
        if ANY_ORIGIN in self.origins:
            return ANY_ORIGIN
        return origin if origin in self.origins else None

    def headers(self, allowed: str) -> dict[str, str]:
        out = {"Access-Control-Allow-Origin": allowed, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        if allowed != ANY_ORIGIN:
            out["Vary"] = "Origin"
        if self.allow_credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        return out


def install_cors(app: web.Application, policy: CorsPolicy) -> None:
    """Answer preflights and add the CORS headers to the answers of allowed origins."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "access-control-request-method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("origin")
        allowed = policy.allowed(origin) if origin else None
        if allowed is None:
            return api_error_response(
                ApiError(403, "This origin may not call the gateway (CORS).", code="cors_origin_not_allowed")
            )
        headers = policy.headers(allowed) | {
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(policy.max_age_s),
        }
        return web.Response(status=204, headers=headers)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("origin")
        if origin and "Access-Control-Allow-Origin" not in response.headers:
            allowed = policy.allowed(origin)
            if allowed is not None:
                response.headers.update(policy.headers(allowed))

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(on_prepare)
