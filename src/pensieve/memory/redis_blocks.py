"""The shared tier's store on Redis: one key per block, `pensieve:<namespace>:block:<key>`.

`redis` is imported here only, when a server is started with --memory-shared: the default
install neither needs nor imports it. Timeouts are short and redis-py's own retries are off, so
a dead or slow store costs a request at most one short wait; the tier (shared.py) then backs off.
Keys are content hashes, so a block is written once (SET NX); each read refreshes its TTL.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pensieve.memory.shared_store import INSTALL_HINT, SharedConfig, SharedStoreError, redacted

T = TypeVar("T")

CONNECT_TIMEOUT_S = 0.5
OP_TIMEOUT_S = 2.0
_SCAN_COUNT = 500


def _import_redis() -> Any:
    try:
        return importlib.import_module("redis")
    except ImportError:
        raise RuntimeError(f"--memory-shared needs the redis package: {INSTALL_HINT}") from None


class RedisBlocks:
    """SharedBlocks (shared.py) on one Redis database."""

    def __init__(self, config: SharedConfig) -> None:
        redis = _import_redis()
        retry = importlib.import_module("redis.retry").Retry
        no_backoff = importlib.import_module("redis.backoff").NoBackoff
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            config.url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=OP_TIMEOUT_S,
            retry=retry(no_backoff(), 0), retry_on_timeout=False)
        self._prefix = f"pensieve:{config.namespace}:block:"
        self._ttl = config.ttl_s or None
        self._name = redacted(config.url)

    @property
    def name(self) -> str:
        return self._name

    def ping(self) -> None:
        self._do(self._client.ping)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> int:
        def put() -> int:
            pipe = self._client.pipeline(transaction=False)
            for key, blob in items:
                pipe.set(self._prefix + key, blob, nx=True, ex=self._ttl)
            done = pipe.execute()
            return sum(len(blob) for (_, blob), ok in zip(items, done, strict=True) if ok)

        return self._do(put)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        def get() -> list[bytes | None]:
            if self._ttl is None:
                return list(self._client.mget([self._prefix + k for k in keys]))
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.getex(self._prefix + key, ex=self._ttl)  # a read keeps a block alive
            return list(pipe.execute())

        return self._do(get)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            self._do(lambda: self._client.unlink(*(self._prefix + k for k in keys)))

    def clear(self) -> int:
        def clear_all() -> int:
            num, batch = 0, []
            for key in self._client.scan_iter(match=self._prefix + "*", count=_SCAN_COUNT):
                batch.append(key)
                if len(batch) >= _SCAN_COUNT:
                    num += int(self._client.unlink(*batch))
                    batch = []
            if batch:
                num += int(self._client.unlink(*batch))
            return num

        return self._do(clear_all)

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._client.close()

    def _do(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as exc:
            raise SharedStoreError(f"{type(exc).__name__}: {exc}") from None
