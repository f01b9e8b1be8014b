"""The shared tier's store: where it is (SharedConfig), what it must offer (SharedBlocks: Redis
in redis_blocks.py; an S3-compatible store could be next), and how its failures are taken
(Outage: one warning per outage, calls backed off while it lasts)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

log = logging.getLogger("pensieve.memory")

_BACKOFF_S = (1.0, 30.0)  # first and longest wait before trying a failed store again
INSTALL_HINT = "pip install 'pensieve-server[cluster]'"
SCHEMES = ("redis", "rediss")


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """Where the shared tier is and how long its blocks live."""

    url: str = field(repr=False)  # redis://[[user]:password@]host:port/db, or rediss://
    ttl_s: int  # 0: no expiry
    namespace: str  # the memory namespace and the llama.cpp version: the keys' prefix


def redacted(url: str) -> str:
    """The URL without its credentials, for logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def open_store(config: SharedConfig) -> SharedBlocks:
    """The store a shared-tier URL names (Redis for redis:// and rediss://)."""
    if urlsplit(config.url).scheme not in SCHEMES:
        raise ValueError(f"unsupported shared tier {redacted(config.url)}: use redis:// or "
                         "rediss://")
    from pensieve.memory.redis_blocks import RedisBlocks  # imports redis

    return RedisBlocks(config)


class SharedStoreError(Exception):
    """The shared store could not be used (unreachable, slow, refusing): a miss, never fatal."""


class SharedBlocks(Protocol):
    """A store of block blobs by key, for one namespace. Blocking calls, made from the tier's
    own threads only; every failure is raised as SharedStoreError."""

    @property
    def name(self) -> str:
        """The store, for logs (no credentials)."""
        ...

    def ping(self) -> None: ...

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Store blobs not stored yet; returns the bytes actually written."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def delete_many(self, keys: Sequence[str]) -> None: ...

    def clear(self) -> int:
        """Delete every blob of this namespace; returns how many."""
        ...

    def close(self) -> None: ...


class Outage:
    """Whether the store is worth calling: after a failure it is left alone for a while
    (doubling up to a limit), and each outage is logged once, when it starts and when it ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._since: float | None = None
        self._retry_at = 0.0
        self._wait = _BACKOFF_S[0]

    def is_down(self) -> bool:
        with self._lock:
            return self._since is not None and time.monotonic() < self._retry_at

    def failed(self, exc: Exception) -> None:
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since, self._wait = now, _BACKOFF_S[0]
                log.warning("memory: the shared tier %s is unavailable (%s); requests compute "
                            "what it would have served until it is back", self.name, exc)
            else:
                self._wait = min(self._wait * 2, _BACKOFF_S[1])
            self._retry_at = now + self._wait

    def succeeded(self) -> None:
        with self._lock:
            if self._since is not None:
                log.info("memory: the shared tier %s is back after %.0f s", self.name,
                         time.monotonic() - self._since)
            self._since = None
