"""The shared memory tier against a real redis-server: round trip, longest-prefix lookup,
namespace isolation, forged blobs refused before a restore, a store that is unreachable or
stops, password auth, TLS, TTLs, deletes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from pensieve.memory.config import MemoryConfig
from pensieve.memory.prefix import Tier, prefix_key
from pensieve.memory.shared_store import SharedConfig
from pensieve.memory.tiered import TieredStore
from tests.cluster.conftest import REDIS_PASSWORD
from tests.support.redis_server import RedisServer, start_redis, stop_redis
from tests.support.server import free_port
from tests.unit.test_memory_blocks import fake_state, toks
from tests.unit.test_memory_shared import forge, full_block_keys

pytestmark = pytest.mark.cluster

BLOCK = 16
TTL_S = 3600


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url())
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def stores() -> Iterator[list[TieredStore]]:
    made: list[TieredStore] = []
    yield made
    for t in made:
        t.close()


def tiered(made: list[TieredStore], url: str, *, namespace: str = "ns",
           shared_namespace: str = "ns-llama", disk: Path | None = None,
           ttl_s: int = TTL_S) -> TieredStore:
    cfg = MemoryConfig(ram_bytes=1 << 30, disk_bytes=(1 << 30) if disk else 0,
                       disk_dir=str(disk) if disk else None, namespace=namespace,
                       block_tokens=BLOCK, shared=SharedConfig(url, ttl_s, shared_namespace))
    t = TieredStore(cfg)
    made.append(t)
    return t


def save(t: TieredStore, tokens: np.ndarray) -> None:
    assert t.save(tokens, fake_state(tokens))
    assert t.shared is not None and t.shared.flush()


def restore(t: TieredStore, want: np.ndarray) -> tuple[int, bytes | None]:
    """Read ahead, wait for it, then what a restore finds: (tokens, sequence state)."""
    read = t.prefetch(want)
    if read is not None and read.shared is not None:
        read.shared.result(timeout=30)
    tier, length = t.best(want)
    return length, t.load(tier, want) if length else None


def next_turn(tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([tokens, toks(9, 900)])


def keys(client: redis.Redis, shared_namespace: str = "ns-llama") -> set[bytes]:
    return set(client.scan_iter(match=f"pensieve:{shared_namespace}:block:*"))


def test_a_conversation_round_trips_through_redis(redis_server: RedisServer,
                                                  client: redis.Redis,
                                                  stores: list[TieredStore],
                                                  tmp_path: Path) -> None:
    tokens = toks(70)
    a = tiered(stores, redis_server.url(), disk=tmp_path)
    save(a, tokens)
    assert a.blocks is not None and a.blocks.files is not None
    a.blocks.files.flush()
    files = {p.stem: p.read_bytes() for p in a.blocks.files.dir.glob("*.kvb")}
    stored = {k.decode().rsplit(":", 1)[1]: client.get(k) for k in keys(client)}
    assert stored == files and len(files) == 5  # a blob is exactly its block file
    b = tiered(stores, redis_server.url())
    assert restore(b, next_turn(tokens)) == (70, fake_state(tokens))
    assert b.best(next_turn(tokens))[0] is Tier.RAM  # kept in RAM once fetched
    summary = b.summary()
    assert summary["shared_hits"] == 1 and summary["shared_blocks_read"] == 5
    assert summary["shared_errors"] == 0 and summary["shared_bad_blobs"] == 0


def test_the_longest_prefix_is_found_in_redis(redis_server: RedisServer, client: redis.Redis,
                                              stores: list[TieredStore]) -> None:
    a = tiered(stores, redis_server.url())
    x = toks(70)
    y = np.concatenate([toks(40), toks(50, 800)])  # branches from x inside its third block
    save(a, x)
    save(a, y)
    b = tiered(stores, redis_server.url())
    assert restore(b, next_turn(y)) == (90, fake_state(y))
    c = tiered(stores, redis_server.url())
    assert restore(c, next_turn(x)) == (70, fake_state(x))
    d = tiered(stores, redis_server.url())
    length, state = restore(d, np.concatenate([toks(40), toks(30, 5000)]))
    assert length == 32 and state == fake_state(toks(32))  # the two blocks x and y share


def test_namespaces_are_isolated(redis_server: RedisServer, client: redis.Redis,
                                 stores: list[TieredStore]) -> None:
    tokens = toks(70)
    save(tiered(stores, redis_server.url()), tokens)
    other_model = tiered(stores, redis_server.url(), namespace="other",
                         shared_namespace="other-llama")
    assert restore(other_model, next_turn(tokens)) == (0, None)
    other_llama_cpp = tiered(stores, redis_server.url(), shared_namespace="ns-newer-llama")
    assert restore(other_llama_cpp, next_turn(tokens)) == (0, None)
    assert len(keys(client)) == 5 and not keys(client, "other-llama")
    save(other_model, tokens)
    assert len(keys(client, "other-llama")) == 5 and len(keys(client)) == 5
    assert other_model.summary()["shared_bad_blobs"] == 0


@pytest.mark.parametrize("how", ["truncated", "bad_checksum", "wrong_key", "other_namespace",
                                 "garbage"])
def test_a_forged_blob_is_refused_before_a_restore_and_deleted(
        redis_server: RedisServer, client: redis.Redis, stores: list[TieredStore],
        how: str) -> None:
    tokens = toks(70)
    save(tiered(stores, redis_server.url()), tokens)
    first, second = (f"pensieve:ns-llama:block:{k}" for k in full_block_keys(tokens)[:2])
    blob = client.get(second)
    assert blob is not None
    client.set(second, forge(blob, how, client.get(first) or b""))
    b = tiered(stores, redis_server.url())
    assert restore(b, next_turn(tokens)) == (16, fake_state(tokens[:16]))  # stops before it
    assert b.shared is not None and b.shared.flush()
    assert not client.exists(second)
    assert b.summary()["shared_bad_blobs"] == 1


def test_an_unreachable_store_is_a_miss_and_a_counter(stores: list[TieredStore]) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    tokens = toks(70)
    a = tiered(stores, nowhere)
    save(a, tokens)  # no exception: dropped
    b = tiered(stores, nowhere)
    assert restore(b, next_turn(tokens)) == (0, None)
    summary = b.summary()
    assert summary["shared_errors"] >= 1 and summary["shared_misses"] == 1
    assert a.summary()["shared_writes_dropped"] == 5


def test_a_store_that_stops_mid_test_is_a_miss_and_a_counter(
        stores: list[TieredStore], tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    try:
        a = tiered(stores, server.url())
        save(a, toks(70))
        assert a.summary()["shared_blocks_written"] == 5
        stop_redis(server)
        b = tiered(stores, server.url())
        assert restore(b, next_turn(toks(70))) == (0, None)
        save(a, toks(40, 3000))  # written behind to a store that is gone: dropped
        assert b.summary()["shared_errors"] >= 1 and b.summary()["shared_misses"] == 1
        assert a.summary()["shared_errors"] >= 1
        assert a.summary()["shared_writes_dropped"] == 3
    finally:
        stop_redis(server)


def test_password_auth(redis_auth_server: RedisServer, stores: list[TieredStore]) -> None:
    tokens = toks(70)
    a = tiered(stores, redis_auth_server.url())
    save(a, tokens)
    assert a.summary()["shared_blocks_written"] == 5
    b = tiered(stores, redis_auth_server.url())
    assert restore(b, next_turn(tokens)) == (70, fake_state(tokens))
    for url in (redis_auth_server.url(password="wrong"), redis_auth_server.url(password="")):
        c = tiered(stores, url)
        assert restore(c, next_turn(tokens)) == (0, None)
        assert c.summary()["shared_errors"] >= 1
    assert REDIS_PASSWORD not in b.shared.store.name  # type: ignore[union-attr]


def test_tls_with_a_password(redis_tls_server: RedisServer,
                            stores: list[TieredStore]) -> None:
    tokens = toks(70)
    a = tiered(stores, redis_tls_server.url())
    save(a, tokens)
    assert a.summary()["shared_blocks_written"] == 5
    b = tiered(stores, redis_tls_server.url())
    assert restore(b, next_turn(tokens)) == (70, fake_state(tokens))
    untrusting = tiered(stores, redis_tls_server.url(trust=False))  # the CA is not known
    assert restore(untrusting, next_turn(tokens)) == (0, None)
    assert untrusting.summary()["shared_errors"] >= 1


def test_blocks_expire_unless_they_are_read(redis_server: RedisServer, client: redis.Redis,
                                            stores: list[TieredStore]) -> None:
    tokens = toks(70)
    save(tiered(stores, redis_server.url()), tokens)
    ttls = [client.ttl(k) for k in keys(client)]
    assert all(0 < t <= TTL_S for t in ttls)
    for k in keys(client):
        client.expire(k, 5)
    restore(tiered(stores, redis_server.url()), next_turn(tokens))
    assert all(client.ttl(k) > 5 for k in keys(client))  # a read gave them their TTL again
    client.flushall()
    save(tiered(stores, redis_server.url(), ttl_s=0), tokens)
    assert {client.ttl(k) for k in keys(client)} == {-1}  # 0: no expiry


def test_deletes_reach_redis(redis_server: RedisServer, client: redis.Redis,
                             stores: list[TieredStore]) -> None:
    a = tiered(stores, redis_server.url())
    x = np.concatenate([toks(32), toks(20, 500)])
    y = np.concatenate([toks(32), toks(20, 600)])
    save(a, x)
    save(a, y)
    save(tiered(stores, redis_server.url(), namespace="other", shared_namespace="other-llama"),
         x)
    assert len(keys(client)) == 6
    assert a.delete(prefix_key(x)) == 1
    assert len(keys(client)) == 4  # x's own two blocks; the shared prompt stays for y
    assert restore(tiered(stores, redis_server.url()), next_turn(y))[0] == len(y)
    a.clear()
    assert keys(client) == set()
    assert len(keys(client, "other-llama")) == 4  # another namespace is not touched
