"""Fixtures for the cluster tests: a real redis-server on a free loopback port (with and without
a password), started once per session and stopped by its PID. Tests that stop a server
themselves start their own with `start_redis`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, start_redis, stop_redis

REDIS_PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture(scope="session")
def redis_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis-auth"), password=REDIS_PASSWORD)
    yield server
    stop_redis(server)



@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """TLS only (no plain port), with a password: the set-up docs/memory.md describes."""
    server = start_redis(tmp_path_factory.mktemp("redis-tls"), password=REDIS_PASSWORD,
                         tls=True)
    yield server
    stop_redis(server)
