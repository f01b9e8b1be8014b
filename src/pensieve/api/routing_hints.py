"""Per-request routing context: the conversation a client names and the replica that answered.

A cluster keeps each conversation on one engine replica (its KV stays there). The client names
the conversation with an `X-Session-Id` header (or a family's own field: OpenAI's `user`, a
Responses chain); the request-context middleware puts a `RequestRouting` here for every
request, `generation.start` reads the session from it and writes back which replica accepted
the request, and the middleware returns that as `X-Pensieve-Replica`. With a local engine no
replica is ever named, and the header is not sent.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

SESSION_HEADER_B = b"x-session-id"
REPLICA_HEADER_B = b"x-pensieve-replica"
_SANE_SESSION = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces


@dataclass(slots=True)
class RequestRouting:
    """Mutable on purpose: the middleware holds the same object the route fills in, whatever
    context copies lie between them."""

    session_id: str | None = None
    replica: str | None = None


routing_var: contextvars.ContextVar[RequestRouting | None] = contextvars.ContextVar(
    "request_routing", default=None)


def session_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The `X-Session-Id` header's value when it is sane, else None (ignored, not an error:
    it is only a routing hint)."""
    for key, value in headers:
        if key.lower() == SESSION_HEADER_B:
            text = value.decode("latin-1")
            return text if _SANE_SESSION.fullmatch(text) else None
    return None


def header_session() -> str | None:
    routing = routing_var.get()
    return routing.session_id if routing is not None else None


def note_replica(replica: str | None) -> None:
    routing = routing_var.get()
    if routing is not None and replica is not None:
        routing.replica = replica
