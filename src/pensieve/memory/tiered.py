"""The slower tiers together: RAM first, disk behind it, with hit and token counters per tier."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pensieve.memory.prefix import Tier
from pensieve.memory.tiers import DiskTier, RamTier, Snapshot

log = logging.getLogger("pensieve.memory")


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    ram_bytes: int
    disk_bytes: int
    disk_dir: str | None  # None: no disk tier
    namespace: str  # model file digest + KV settings; entries never cross namespaces


def _per_tier() -> dict[str, int]:
    return {tier.value: 0 for tier in Tier}


@dataclass(slots=True)
class MemoryStats:
    hits: dict[str, int] = field(default_factory=_per_tier)  # by Tier value
    tokens_saved: dict[str, int] = field(default_factory=_per_tier)
    misses: int = 0


def namespace_for(model_digest: str, **kv_settings: object) -> str:
    """A short, stable name for (model file, KV settings): what a KV snapshot depends on."""
    settings = ",".join(f"{k}={kv_settings[k]}" for k in sorted(kv_settings))
    return hashlib.sha256(f"{model_digest}|{settings}|v1".encode()).hexdigest()[:24]


# A disk prefix must beat RAM's by this many tokens to be worth reading ahead.
_PREFETCH_MARGIN = 4
_MAX_READS_AHEAD = 8


class TieredStore:
    """RAM and disk behind the live tier. Used from the engine thread only; disk reads ahead of a
    restore (`prefetch`) run on a reader thread and land in RAM when the engine next looks."""

    def __init__(self, config: MemoryConfig) -> None:
        self.ram = RamTier(config.ram_bytes)
        self.disk = (DiskTier(Path(config.disk_dir), config.namespace, config.disk_bytes)
                     if config.disk_dir else None)
        self.stats = MemoryStats()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="pensieve-disk-read")
        self._reads: dict[str, Future[Snapshot | None]] = {}  # disk key -> read in flight/done
        if self.disk is not None and len(self.disk):
            log.info("memory: %d conversations on disk (%.1f MiB)", len(self.disk),
                     self.disk.num_bytes / 2**20)

    def save(self, tokens: np.ndarray, data: bytes) -> None:
        snap = Snapshot(tokens, data)
        self.ram.put(snap)
        if self.disk is not None:
            self.disk.put(snap)

    def prefetch(self, want: np.ndarray) -> Future[Snapshot | None] | None:
        """Start reading the disk snapshot that would serve `want`, when it beats RAM's; the
        request can wait for it while other sequences keep computing (see Scheduler)."""
        if self.disk is None or len(want) == 0:
            return None
        key, disk_len = self.disk.best(want)
        if key is None or disk_len < self.ram.best(want)[1] + _PREFETCH_MARGIN:
            return None
        if key not in self._reads:
            while len(self._reads) >= _MAX_READS_AHEAD:  # reads nobody came back for
                self._reads.pop(next(iter(self._reads)))
            self._reads[key] = self._reader.submit(self.disk.load, key)
        return self._reads[key]

    def best(self, want: np.ndarray) -> tuple[Tier, int]:
        _, ram_len = self.ram.best(want)
        disk_len = self.disk.best(want)[1] if self.disk is not None else 0
        if ram_len >= disk_len:
            return Tier.RAM, ram_len
        return Tier.DISK, disk_len

    def load(self, tier: Tier, want: np.ndarray) -> bytes | None:
        if tier is Tier.RAM:
            snap, _ = self.ram.best(want)
            return snap.data if snap is not None else None
        if self.disk is None:
            return None
        key, _ = self.disk.best(want)
        if key is None:
            return None
        read = self._reads.pop(key, None)  # read ahead (or still being read): no second read
        snap = read.result() if read is not None else self.disk.load(key)
        if snap is None:
            return None
        self.ram.put(snap)  # promote: the next turn finds it in RAM
        return snap.data

    def record(self, tier: Tier | None, num_tokens: int) -> None:
        if tier is None or num_tokens == 0:
            self.stats.misses += 1
            return
        self.stats.hits[tier.value] += 1
        self.stats.tokens_saved[tier.value] += num_tokens

    def entries(self) -> dict[Tier, list[tuple[str, int, int, float]]]:
        out = {Tier.RAM: self.ram.entries()}
        if self.disk is not None:
            self.disk.flush(timeout=10.0)  # list what is on disk, not what is about to be
            out[Tier.DISK] = self.disk.entries()
        return out

    def delete(self, key: str) -> int:
        removed = int(self.ram.remove(key))
        if self.disk is not None:
            removed += int(self.disk.remove(key))
        return removed

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()
