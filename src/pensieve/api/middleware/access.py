"""Who may call the server: API keys, the Host header (DNS rebinding) and the Origin header.

One pure ASGI middleware, route-agnostic by construction: it sees every HTTP request before
routing, so a route added later is covered without anyone remembering to. Refusals are answered
in the shape of the API family the path belongs to (api/errors.py).

    request -> Host allowed? (400) -> Origin allowed? (403) -> key valid? (401) -> the app
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from pensieve.api.errors import error_response

log = logging.getLogger("pensieve.access")

PUBLIC_PATHS = frozenset({"/health", "/ready"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class AccessConfig:
    api_keys: tuple[str, ...] = ()
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @property
    def requires_key(self) -> bool:
        return bool(self.api_keys)

    def host_names(self) -> frozenset[str] | None:
        """Host header names accepted, or None for any."""
        if "*" in self.allowed_hosts:
            return None
        if not self.allowed_hosts and not is_loopback(self.bind_host):
            return None  # reachable from elsewhere by design; keys guard it
        return frozenset(h.lower().strip("[]") for h in
                         (*LOOPBACK_NAMES, self.bind_host, *self.allowed_hosts))


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_key_file(path: Path) -> list[str]:
    """API keys from a file, one per line; blank lines and '#' comments are skipped."""
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def key_matches(candidate: str, keys: tuple[str, ...]) -> bool:
    """Constant time in the candidate's content: every key is compared, none short-circuits."""
    given = candidate.encode("utf-8", errors="replace")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8"))
    return found


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def host_name(host_header: str) -> str:
    """'example.com:8080' -> 'example.com'; '[::1]:8080' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0].lower()
    return host_header.rsplit(":", 1)[0].lower() if host_header.count(":") == 1 \
        else host_header.lower()


class AccessMiddleware:
    """Checks Host, Origin and the API key of every HTTP request except the public paths."""

    def __init__(self, app: ASGIApp, config: AccessConfig):
        self.app = app
        self.config = config
        self._hosts = config.host_names()
        self._origins = frozenset(o.rstrip("/").lower() for o in config.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message, code = refusal
        log.warning("refused %s %s: %s", scope["method"], scope["path"], code)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        type_ = "authentication_error" if status == 401 else "invalid_request_error"
        response = error_response(scope["path"], status, message, type_=type_, code=code,
                                  headers=headers)
        await response(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = _headers(scope)
        host = headers.get("host", "")
        if self._hosts is not None and host_name(host) not in self._hosts:
            return 400, ("The Host header is not one this server answers to (DNS rebinding "
                         "protection); add it with --allowed-hosts."), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return 403, ("Requests from this browser origin are not allowed; add it with "
                         "--cors-origins."), "origin_not_allowed"
        if self.config.requires_key and scope["path"] not in PUBLIC_PATHS:
            key = presented_key(headers)
            if key is None:
                return 401, ("This server requires an API key: send 'Authorization: Bearer "
                             "KEY' or 'x-api-key: KEY'."), "missing_api_key"
            if not key_matches(key, self.config.api_keys):
                return 401, "The API key is not valid.", "invalid_api_key"
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self._origins or origin in self._origins:
            return True
        return urlsplit(origin).netloc == host.lower()  # same origin (the /docs page)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
