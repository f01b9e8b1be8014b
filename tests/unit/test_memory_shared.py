"""The shared memory tier over a fake store (a dict): write behind, read ahead, verification,
deletes, and a store that is down. tests/cluster/test_shared_tier.py runs the same paths
against a real redis-server."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from pensieve.memory import shared_store
from pensieve.memory.blockfiles import block_key, encode_block
from pensieve.memory.blocks import chain_seed
from pensieve.memory.config import MemoryConfig
from pensieve.memory.prefix import Tier, prefix_key
from pensieve.memory.shared_store import SharedStoreError
from pensieve.memory.tiered import ReadAhead, TieredStore
from tests.unit.test_memory_blocks import fake_state, toks

BLOCK = 16


class FakeStore:
    """SharedBlocks in a dict. With `down`, every call fails as an unreachable store's does."""

    name = "fake://store"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.down = False
        self.num_calls = 0
        self.asked: list[str] = []

    def _call(self) -> None:
        self.num_calls += 1
        if self.down:
            raise SharedStoreError("Connection refused")

    def ping(self) -> None:
        self._call()

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> int:
        self._call()
        new = [(k, b) for k, b in items if k not in self.blobs]
        self.blobs.update(new)
        return sum(len(b) for _, b in new)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._call()
        self.asked += keys
        return [self.blobs.get(k) for k in keys]

    def delete_many(self, keys: Sequence[str]) -> None:
        self._call()
        for k in keys:
            self.blobs.pop(k, None)

    def clear(self) -> int:
        self._call()
        num = len(self.blobs)
        self.blobs.clear()
        return num

    def close(self) -> None:
        pass


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def stores() -> Iterator[list[TieredStore]]:
    """Tiered stores made by a test (`tiered`), closed after it."""
    made: list[TieredStore] = []
    yield made
    for t in made:
        t.close()


def tiered(made: list[TieredStore], store: FakeStore, disk: Path | None = None,
           namespace: str = "ns") -> TieredStore:
    cfg = MemoryConfig(ram_bytes=1 << 30, disk_bytes=(1 << 30) if disk else 0,
                       disk_dir=str(disk) if disk else None, namespace=namespace,
                       block_tokens=BLOCK)
    t = TieredStore(cfg, shared_store=store)
    made.append(t)
    return t


def save(t: TieredStore, tokens: np.ndarray) -> None:
    assert t.save(tokens, fake_state(tokens))
    assert t.shared is not None and t.shared.flush()


def fetch(t: TieredStore, want: np.ndarray) -> ReadAhead:
    read = t.prefetch(want)
    assert read is not None and read.is_remote and read.shared is not None
    read.shared.result(timeout=10)
    return read


def conversation(n: int = 70, first: int = 0) -> np.ndarray:
    return toks(n, first)


def full_block_keys(tokens: np.ndarray, namespace: str = "ns") -> list[str]:
    keys, parent = [], chain_seed(namespace, BLOCK)
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        parent = block_key(parent, tokens[start : start + BLOCK])
        keys.append(parent)
    return keys


def test_new_blocks_are_written_behind_once(stores: list[TieredStore], store: FakeStore) -> None:
    a = tiered(stores, store)
    save(a, conversation(40))  # [0,16) [16,32) and the partial [32,40)
    assert len(store.blobs) == 3
    save(a, conversation(70))  # [32,48) [48,64) [64,70) are new; the first two are not sent
    assert len(store.blobs) == 6
    save(a, conversation(70))
    summary = a.summary()
    assert summary["shared_blocks_written"] == 6 and summary["shared_write_queue"] == 0
    assert summary["shared_bytes_written"] == sum(len(b) for b in store.blobs.values())


def test_a_blob_is_the_bytes_of_the_block_file(stores: list[TieredStore], store: FakeStore,
                                                tmp_path: Path) -> None:
    a = tiered(stores, store, disk=tmp_path)
    save(a, conversation(70))
    assert a.blocks is not None and a.blocks.files is not None
    a.blocks.files.flush()
    files = {p.stem: p.read_bytes() for p in a.blocks.files.dir.glob("*.kvb")}
    assert files == store.blobs and len(files) == 5


def test_a_fresh_server_restores_a_conversation_from_the_shared_tier(
        stores: list[TieredStore], store: FakeStore) -> None:
    tokens = conversation(70)  # four full blocks and a partial one
    save(tiered(stores, store), tokens)
    b = tiered(stores, store)
    want = np.concatenate([tokens, toks(9, 900)])  # the next turn
    assert b.best(want)[1] == 0  # nothing local
    fetch(b, want)
    assert b.best(want) == (Tier.RAM, 70)  # fetched blocks land in RAM
    assert b.load(Tier.RAM, want) == fake_state(tokens)
    summary = b.summary()
    assert summary["shared_hits"] == 1 and summary["shared_blocks_read"] == 5
    assert summary["shared_bytes_read"] == sum(len(x) for x in store.blobs.values())


def test_the_shared_tier_continues_the_local_chain(stores: list[TieredStore],
                                                   store: FakeStore) -> None:
    tokens = conversation(70)
    save(tiered(stores, store), tokens)
    b = tiered(stores, store)
    save(b, tokens[:32])  # b holds the first two blocks itself
    want = np.concatenate([tokens, toks(9, 900)])
    assert b.best(want)[1] == 32
    fetch(b, want)
    assert b.best(want)[1] == 70
    assert b.load(Tier.RAM, want) == fake_state(tokens)
    first_two = full_block_keys(tokens)[:2]
    assert not set(first_two) & set(store.asked)  # only what lies past the local chain is asked


def test_nothing_is_asked_for_when_local_memory_covers_the_prompt(
        stores: list[TieredStore], store: FakeStore) -> None:
    a = tiered(stores, store)
    tokens = conversation(70)
    save(a, tokens)
    assert a.prefetch(np.concatenate([tokens, toks(2, 900)])) is None
    assert store.asked == []


def forge(blob: bytes, how: str, other_blob: bytes) -> bytes:
    if how == "truncated":
        return blob[:-5]
    if how == "bad_checksum":
        return blob[:-1] + bytes([blob[-1] ^ 0xFF])
    if how == "wrong_key":
        return other_blob  # a real block, stored under another block's key
    if how == "other_namespace":
        return blob.replace(b'"namespace": "ns"', b'"namespace": "xx"', 1)
    return b"not a block at all"


@pytest.mark.parametrize("how", ["truncated", "bad_checksum", "wrong_key", "other_namespace",
                                 "garbage"])
def test_a_bad_blob_is_refused_deleted_and_counted(stores: list[TieredStore], store: FakeStore,
                                                   how: str) -> None:
    tokens = conversation(70)
    save(tiered(stores, store), tokens)
    b = tiered(stores, store)
    want = np.concatenate([tokens, toks(9, 900)])
    first, second = full_block_keys(tokens)[:2]
    assert second in store.blobs
    store.blobs[second] = forge(store.blobs[second], how, store.blobs[first])
    fetch(b, want)
    assert b.shared is not None and b.shared.flush()
    assert second not in store.blobs  # deleted from the store
    assert b.summary()["shared_bad_blobs"] == 1
    assert b.best(want)[1] == 16  # the chain stops before the bad block: the rest is computed
    assert b.load(Tier.RAM, want) == fake_state(tokens[:16])


def test_a_blob_of_another_layout_is_not_used(stores: list[TieredStore],
                                              store: FakeStore) -> None:
    tokens = conversation(70)
    a = tiered(stores, store)
    save(a, tokens)
    b = tiered(stores, store)
    save(b, toks(16, 5000))  # b's own layout (v rows)
    assert b.blocks is not None and b.blocks.layout is not None
    key = full_block_keys(tokens)[0]
    other = encode_block("ns", key, b.blocks.seed, 0, tokens[:16], '{"n_stream": 4, '
                         '"v_trans": true, "layers": []}', b"")
    store.blobs = {key: other}
    fetch(b, np.concatenate([tokens, toks(9, 900)]))
    assert b.best(tokens)[1] == 0


def test_an_unreachable_store_is_a_miss_and_a_counter(stores: list[TieredStore],
                                                      store: FakeStore,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shared_store, "_BACKOFF_S", (0.2, 0.2))
    store.down = True
    caplog.set_level(logging.WARNING, "pensieve.memory")
    a = tiered(stores, store)
    tokens = conversation(70)
    save(a, tokens)  # written behind: dropped, never raised
    b = tiered(stores, store)
    want = np.concatenate([tokens, toks(9, 900)])
    read = b.prefetch(want)
    assert read is not None and read.shared is not None and read.shared.result(10) == []
    assert b.best(want)[1] == 0 and b.load(Tier.RAM, want) is None
    calls = store.num_calls
    read = b.prefetch(np.concatenate([tokens, toks(9, 700)]))  # backing off: not called
    assert read is not None and read.shared is not None and read.shared.result(10) == []
    assert store.num_calls == calls
    summary = {**a.summary(), **{f"b_{k}": v for k, v in b.summary().items()}}
    assert summary["shared_writes_dropped"] == 5 and summary["shared_blocks_written"] == 0
    assert summary["b_shared_errors"] >= 1 and summary["b_shared_misses"] == 2
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 2  # one per tier (a and b), not one per call
    store.down = False
    time.sleep(0.3)  # the back-off has passed: the store is tried again
    save(a, toks(40, 3000))
    assert len(store.blobs) == 3


def test_deleting_a_conversation_deletes_its_own_blocks_in_the_shared_tier(
        stores: list[TieredStore], store: FakeStore) -> None:
    a = tiered(stores, store)
    x = np.concatenate([toks(32), toks(20, 500)])
    y = np.concatenate([toks(32), toks(20, 600)])
    save(a, x)
    save(a, y)
    assert len(store.blobs) == 6  # two shared blocks, two of each conversation's own
    assert a.delete(prefix_key(x)) == 1
    assert len(store.blobs) == 4
    b = tiered(stores, store)
    fetch(b, np.concatenate([x, toks(9, 900)]))
    assert b.best(x)[1] == 32  # the shared prompt is still there, x's own blocks are not
    a.clear()
    assert store.blobs == {}


def test_a_read_ahead_is_waited_for_only_until_its_deadline() -> None:
    never: Future[list] = Future()
    assert not ReadAhead(shared=never, deadline=time.monotonic() + 60).done()
    assert ReadAhead(shared=never, deadline=time.monotonic() - 1).done()
    disk: Future[bytes] = Future()
    assert not ReadAhead(disk=disk, shared=never, deadline=time.monotonic() - 1).done()
    assert not ReadAhead(disk=disk).is_remote and ReadAhead(shared=never).is_remote
