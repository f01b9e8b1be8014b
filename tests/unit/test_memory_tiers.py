"""RAM and disk tiers: round trips, budgets, and files that must never be restored."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pensieve.memory.config import MemoryConfig, namespace_for
from pensieve.memory.prefix import Tier
from pensieve.memory.tiered import TieredStore
from pensieve.memory.tiers import DiskTier, RamTier, Snapshot


def snap(first: int, n: int, payload: bytes = b"kv-state") -> Snapshot:
    return Snapshot(np.arange(first, first + n, dtype=np.int32), payload * n)


def want(first: int, n: int) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.int32)


def test_ram_tier_finds_the_longest_prefix() -> None:
    ram = RamTier(1 << 20)
    ram.put(snap(0, 10))
    ram.put(snap(0, 30))
    ram.put(snap(500, 40))
    found, n = ram.best(want(0, 25))
    assert n == 25 and found is not None and len(found.tokens) == 30
    assert ram.best(want(9000, 5)) == (None, 0)


def test_ram_budget_evicts_by_retention_value() -> None:
    a, b = snap(0, 100), snap(1000, 10)
    budget = 2 * a.num_bytes + 10  # room for two 100-token snapshots, not a third one
    ram = RamTier(budget)
    ram.put(a)
    ram.put(b)
    b.last_used = a.last_used = time.monotonic()
    ram.put(snap(5000, 100))  # over budget: the cheap-to-recompute 10-token one goes first
    assert ram.num_bytes <= budget
    assert ram.best(want(1000, 10))[1] == 0
    assert ram.best(want(0, 100))[1] == 100


def disk(tmp_path: Path, namespace: str = "ns", budget: int = 1 << 30) -> DiskTier:
    return DiskTier(tmp_path, namespace, budget)


def test_disk_round_trip_survives_a_new_instance(tmp_path: Path) -> None:
    d = disk(tmp_path)
    original = snap(0, 50, b"\x01\x02")
    d.put(original)
    d.close()
    again = disk(tmp_path)
    key, n = again.best(want(0, 60))
    assert n == 50 and key is not None
    loaded = again.load(key)
    assert loaded is not None
    assert loaded.data == original.data
    assert np.array_equal(loaded.tokens, original.tokens)


def _written(tmp_path: Path) -> Path:
    d = disk(tmp_path)
    d.put(snap(0, 50))
    d.close()
    (path,) = (tmp_path / "ns").glob("*.kv")
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_token", "bad_magic",
                                    "garbage_header", "empty"])
def test_damaged_files_are_never_restored(tmp_path: Path, damage: str) -> None:
    path = _written(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "flip_data":
        raw[-1] ^= 0xFF
    elif damage == "flip_token":
        raw[len(raw) - 50 * len(b"kv-state") - 4] ^= 0x01
    elif damage == "bad_magic":
        raw[:4] = b"XXXX"
    elif damage == "garbage_header":
        raw[12:20] = b"{{{{{{{{"
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    d = disk(tmp_path)
    key, n = d.best(want(0, 50))
    if key is not None:  # the header still parsed: the checksum must catch it on load
        assert d.load(key) is None
        assert d.best(want(0, 50)) == (None, 0)
    assert not path.exists()


def test_a_crash_mid_write_leaves_nothing_listed(tmp_path: Path) -> None:
    (tmp_path / "ns").mkdir(parents=True)
    (tmp_path / "ns" / "abc.tmp1234").write_bytes(b"PNSVKV01 half a file")
    d = disk(tmp_path)
    assert len(d) == 0
    assert not list((tmp_path / "ns").glob("*.tmp*"))


def test_other_namespaces_never_match(tmp_path: Path) -> None:
    _written(tmp_path)
    other = disk(tmp_path, namespace="other-model")
    assert other.best(want(0, 50)) == (None, 0)
    assert namespace_for("digest-a", fa="on") != namespace_for("digest-b", fa="on")
    assert namespace_for("digest-a", fa="on") != namespace_for("digest-a", fa="off")


def test_disk_budget_holds(tmp_path: Path) -> None:
    one = snap(0, 100).num_bytes
    d = disk(tmp_path, budget=3 * one)
    for i in range(8):
        d.put(snap(i * 1000, 100))
    d.flush()
    assert len(d) <= 3
    assert d.num_bytes <= 3 * one + 3 * 512  # payload plus headers


def test_store_counts_hits_per_tier_and_promotes_disk_to_ram(tmp_path: Path) -> None:
    cfg = MemoryConfig(ram_bytes=1 << 20, disk_bytes=1 << 30, disk_dir=str(tmp_path),
                       namespace="ns")
    store = TieredStore(cfg)
    store.save(want(0, 40), b"state")
    store.close()
    fresh = TieredStore(cfg)  # as after a restart: RAM empty, disk full
    assert fresh.best(want(0, 40)) == (Tier.DISK, 40)
    assert fresh.load(Tier.DISK, want(0, 40)) == b"state"
    assert fresh.best(want(0, 40)) == (Tier.RAM, 40)
    fresh.record(Tier.DISK, 40)
    fresh.record(None, 0)
    assert fresh.stats.hits["disk"] == 1 and fresh.stats.tokens_saved["disk"] == 40
    assert fresh.stats.misses == 1
    fresh.close()


def test_ram_keeps_only_the_longest_of_nested_prefixes() -> None:
    ram = RamTier(1 << 20)
    ram.put(snap(0, 10))
    ram.put(snap(0, 30))  # the conversation's next turn: the 10-token entry is now redundant
    assert len(ram) == 1 and ram.num_bytes == snap(0, 30).num_bytes
    ram.put(snap(0, 20))  # already served by the 30-token entry: not stored twice
    assert len(ram) == 1
    ram.put(Snapshot(np.array([0, 1, 7], dtype=np.int32), b"x"))
    assert len(ram) == 2  # diverges from the stored entry: a different conversation


def test_disk_keeps_only_the_longest_of_nested_prefixes(tmp_path: Path) -> None:
    d = disk(tmp_path)
    d.put(snap(0, 10))
    d.put(snap(0, 30))
    d.put(snap(0, 20))
    d.flush()
    assert len(d) == 1 and d.best(want(0, 40))[1] == 30
    assert len(list(d.dir.glob("*.kv"))) == 1


def test_a_disk_snapshot_is_read_ahead_once_and_still_counts_as_disk(tmp_path: Path) -> None:
    cfg = MemoryConfig(ram_bytes=1 << 20, disk_bytes=1 << 30, disk_dir=str(tmp_path),
                       namespace="ns")
    store = TieredStore(cfg)
    store.save(want(0, 40), b"state")
    store.close()
    fresh = TieredStore(cfg)
    assert fresh.disk is not None
    read = fresh.prefetch(want(0, 39))
    again = fresh.prefetch(want(0, 39))
    assert read is not None and read.disk is not None and not read.is_remote
    assert again is not None and again.disk is read.disk  # one read per snapshot
    read.disk.result(timeout=10)
    calls: list[str] = []
    fresh.disk.load = lambda key: calls.append(key)  # type: ignore[method-assign]
    assert fresh.best(want(0, 39)) == (Tier.DISK, 39)  # read ahead, but it came from disk
    assert fresh.load(Tier.DISK, want(0, 39)) == b"state" and calls == []  # no second read
    assert fresh.prefetch(want(0, 39)) is None  # now in RAM: nothing to read ahead
    assert fresh.prefetch(want(1000, 5)) is None  # nothing on disk for it
    fresh.close()
