"""The slower tiers together: RAM first, disk behind it, then an optional shared tier (shared.py,
many servers' blocks in Redis), with hit and token counters per tier.

A saved sequence state is cut into blocks (blocks.py) when its layout is recognised
(kvstate.py); otherwise it is kept as a whole snapshot (tiers.py), with the reason logged once.
Whole snapshots written by earlier versions are still found, checked and restored; a conversation
saved as blocks drops the snapshots it covers.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pensieve.memory.blockfiles import BlockFiles
from pensieve.memory.blocks import Block, BlockStore, FetchedBlock
from pensieve.memory.config import MemoryConfig
from pensieve.memory.kvstate import UnknownLayout, parse
from pensieve.memory.prefix import Tier, prefix_key
from pensieve.memory.shared import READ_WAIT_S, SharedTier
from pensieve.memory.shared_store import SharedBlocks, open_store
from pensieve.memory.tiers import DiskTier, RamTier, Snapshot

log = logging.getLogger("pensieve.memory")




def _per_tier() -> dict[str, int]:
    return {tier.value: 0 for tier in Tier}


@dataclass(slots=True)
class MemoryStats:
    hits: dict[str, int] = field(default_factory=_per_tier)  # by Tier value
    tokens_saved: dict[str, int] = field(default_factory=_per_tier)
    misses: int = 0
    snapshot_bytes_to_ram: int = 0  # whole snapshots copied into RAM, ever
    snapshot_bytes_to_disk: int = 0  # ... and queued for disk


@dataclass(frozen=True, slots=True)
class EntryRow:
    """One remembered prefix in one tier, as /admin/memory lists it."""

    key: str
    tier: Tier
    num_tokens: int
    num_bytes: int
    last_used: float
    num_blocks: int = 0  # 0: a whole snapshot
    num_shared: int = 0


@dataclass(frozen=True, slots=True)
class ReadAhead:
    """The reads `prefetch` started for one request, which waits for them while others compute
    (Scheduler): a disk read until it is done; a shared-tier read, over the network, until it
    is done or its deadline passes (then the request computes what did not come in time)."""

    disk: Future[Any] | None = None
    shared: Future[list[FetchedBlock]] | None = None
    deadline: float = 0.0  # time.monotonic()

    @property
    def is_remote(self) -> bool:
        return self.shared is not None

    def done(self) -> bool:
        if self.disk is not None and not self.disk.done():
            return False
        return self.shared is None or self.shared.done() or time.monotonic() >= self.deadline

# A disk prefix must beat RAM's by this many tokens to be worth reading ahead.
_PREFETCH_MARGIN = 4
_MAX_READS_AHEAD = 8


@dataclass(frozen=True, slots=True)
class _Choice:
    tier: Tier
    length: int
    path: list[Block] | None  # blocks; None: a whole snapshot


class TieredStore:
    """RAM and disk behind the live tier. Used from the engine thread only; disk reads ahead of a
    restore (`prefetch`) run on a reader thread and land in RAM when the engine next looks."""

    def __init__(self, config: MemoryConfig, shared_store: SharedBlocks | None = None) -> None:
        """`shared_store`: the shared tier's store (default: the one config.shared names)."""
        self.config = config
        self.ram = RamTier(config.ram_bytes)
        self.disk = (DiskTier(Path(config.disk_dir), config.namespace, config.disk_bytes)
                     if config.disk_dir else None)
        self.blocks = self._block_store(config) if config.block_tokens > 0 else None
        self.shared = self._shared_tier(config, self.blocks, shared_store)
        self.stats = MemoryStats()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="pensieve-disk-read")
        self._reads: dict[str, Future[Snapshot | None]] = {}  # disk key -> read in flight/done
        self._block_reads: dict[str, Future[dict[str, bytes]]] = {}  # last block key -> read
        self._shared_reads: dict[str, Future[list[FetchedBlock]]] = {}  # want's key -> read
        self._fallback_reasons: set[str] = set()
        if self.disk is not None and len(self.disk):
            log.info("memory: %d conversations on disk (%.1f MiB)", len(self.disk),
                     self.disk.num_bytes / 2**20)

    @staticmethod
    def _block_store(config: MemoryConfig) -> BlockStore:
        files = (BlockFiles(Path(config.disk_dir), config.namespace)
                 if config.disk_dir and config.disk_bytes > 0 else None)
        return BlockStore(config.namespace, config.block_tokens, config.ram_bytes,
                          config.disk_bytes, files)

    @staticmethod
    def _shared_tier(config: MemoryConfig, blocks: BlockStore | None,
                     store: SharedBlocks | None) -> SharedTier | None:
        if store is None and config.shared is None:
            return None
        if blocks is None:
            raise ValueError("the shared memory tier holds KV blocks: it needs "
                             "--memory-block-tokens above 0")
        if store is None and config.shared is not None:
            store = open_store(config.shared)
        assert store is not None
        tier = SharedTier(store, config.namespace, blocks.seed, blocks.block_tokens)
        blocks.shared = tier
        log.info("memory: shared tier %s", tier.store.name)
        return tier

    # --- save ---------------------------------------------------------------------------------
    def stored_prefix(self, tokens: np.ndarray) -> int:
        """Leading tokens already kept as blocks: a save may bring only the state after them."""
        if self.blocks is None or self.blocks.layout is None:
            return 0
        return self.blocks.stored_prefix(tokens)

    def save(self, tokens: np.ndarray, data: bytes, first_pos: int = 0) -> bool:
        """Keep a sequence's state (of positions [first_pos, len(tokens))); False when a
        partial state could not be used (the caller then brings the whole one)."""
        if self.blocks is not None and self._save_blocks(tokens, data, first_pos):
            return True
        if first_pos:
            return False
        snap = Snapshot(tokens, data)
        self.ram.budget_bytes = self.config.ram_bytes - self._block_bytes(ram=True)
        self.ram.put(snap)
        self.stats.snapshot_bytes_to_ram += snap.num_bytes
        if self.disk is not None:
            self.disk.budget_bytes = self.config.disk_bytes - self._block_bytes(ram=False)
            self.disk.put(snap)
            self.stats.snapshot_bytes_to_disk += snap.num_bytes
        return True

    def _save_blocks(self, tokens: np.ndarray, data: bytes, first_pos: int) -> bool:
        assert self.blocks is not None
        try:
            state = parse(data, first_pos)
            self.blocks.ram_budget = self.config.ram_bytes - self.ram.num_bytes
            self.blocks.disk_budget = self.config.disk_bytes - (
                self.disk.num_bytes if self.disk is not None else 0)
            self.blocks.save(tokens, state, first_pos)
        except UnknownLayout as exc:
            if str(exc) not in self._fallback_reasons:
                self._fallback_reasons.add(str(exc))
                log.warning("memory: keeping a whole snapshot, not blocks: the sequence state "
                            "is not one this version can cut (%s)", exc)
            return False
        self._drop_covered_snapshots(tokens)
        return True

    def _drop_covered_snapshots(self, tokens: np.ndarray) -> None:
        """Snapshots (of this version or an earlier one) this conversation's blocks now serve."""
        if len(self.ram):
            snap, n = self.ram.best(tokens)
            if snap is not None and n == len(snap.tokens):
                self.ram.remove(snap.key)
        if self.disk is not None and len(self.disk):
            key, n = self.disk.best(tokens)
            if key is not None and n == self.disk.num_tokens(key):
                self.disk.forget(key)

    def _block_bytes(self, *, ram: bool) -> int:
        if self.blocks is None:
            return 0
        return self.blocks.ram_bytes if ram else self.blocks.disk_bytes

    # --- lookup and restore -------------------------------------------------------------------
    def _choose(self, want: np.ndarray) -> _Choice:
        self._adopt_shared()
        _, ram_len = self.ram.best(want)
        disk_len = self.disk.best(want)[1] if self.disk is not None else 0
        snap = _Choice(Tier.RAM, ram_len, None) if ram_len >= disk_len else \
            _Choice(Tier.DISK, disk_len, None)
        if self.blocks is None:
            return snap
        path, length = self.blocks.match(want)
        if length > snap.length:
            return _Choice(self.blocks.tier_of(path), length, path)
        return snap

    def prefetch(self, want: np.ndarray) -> ReadAhead | None:
        """Start reading what would serve `want`: from disk when it beats RAM, and from the
        shared tier the blocks past the local chain; the request can wait for them while
        other sequences keep computing (see Scheduler)."""
        if len(want) == 0:
            return None
        choice = self._choose(want)
        disk = self._prefetch_disk(want, choice)
        shared = self._prefetch_shared(want, choice.length)
        if disk is None and shared is None:
            return None
        return ReadAhead(disk, shared, time.monotonic() + READ_WAIT_S)

    def _prefetch_disk(self, want: np.ndarray, choice: _Choice) -> Future[Any] | None:
        if choice.path is not None:
            return self._prefetch_blocks(choice.path)
        if self.disk is None or choice.tier is not Tier.DISK:
            return None
        key, disk_len = self.disk.best(want)
        if key is None or disk_len < self.ram.best(want)[1] + _PREFETCH_MARGIN:
            return None
        if key not in self._reads:
            while len(self._reads) >= _MAX_READS_AHEAD:  # reads nobody came back for
                self._reads.pop(next(iter(self._reads)))
            self._reads[key] = self._reader.submit(self.disk.load, key)
        return self._reads[key]

    def _prefetch_blocks(self, path: list[Block]) -> Future[dict[str, bytes]] | None:
        assert self.blocks is not None
        todo = self.blocks.disk_reads(path)
        files = self.blocks.files
        if not todo or files is None:
            return None
        last = path[-1].key
        if last not in self._block_reads:
            while len(self._block_reads) >= _MAX_READS_AHEAD:
                self._block_reads.pop(next(iter(self._block_reads)))

            def read_all() -> dict[str, bytes]:
                out = {}
                for key, parent, tokens in todo:
                    data = files.read(key, parent, tokens)
                    if data is not None:
                        out[key] = data
                return out

            self._block_reads[last] = self._reader.submit(read_all)
        return self._block_reads[last]

    def _prefetch_shared(self, want: np.ndarray,
                         local_len: int) -> Future[list[FetchedBlock]] | None:
        """Ask the shared tier for the blocks that continue the local chain of `want`, when
        what is held here leaves enough of it to compute."""
        if self.shared is None or self.blocks is None \
                or len(want) - local_len < _PREFETCH_MARGIN:
            return None
        key = prefix_key(want)
        if key not in self._shared_reads:
            while len(self._shared_reads) >= _MAX_READS_AHEAD:  # reads nobody came back for
                self._shared_reads.pop(next(iter(self._shared_reads)))
            parent, start = self.blocks.chain_end(want)
            self._shared_reads[key] = self.shared.read_ahead(want.copy(), parent, start)
        return self._shared_reads[key]

    def _adopt_shared(self) -> None:
        """Blocks the shared tier has fetched by now join the local chains (in RAM)."""
        if self.blocks is None:
            return
        for key, read in list(self._shared_reads.items()):
            if not read.done():
                continue
            del self._shared_reads[key]
            error = None if read.cancelled() else read.exception()
            if error is not None:  # a bug, not the store (its failures are misses)
                log.warning("memory: a shared-tier read failed: %r", error)
            elif not read.cancelled():
                self.blocks.adopt(read.result())

    def best(self, want: np.ndarray) -> tuple[Tier, int]:
        choice = self._choose(want)
        return choice.tier, choice.length

    def load(self, tier: Tier, want: np.ndarray) -> bytes | None:
        choice = self._choose(want)
        if choice.path is not None:
            return self._load_blocks(choice.path)
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

    def _load_blocks(self, path: list[Block]) -> bytes | None:
        assert self.blocks is not None
        read = self._block_reads.pop(path[-1].key, None)
        ready = read.result() if read is not None else None
        try:
            return self.blocks.read(path, ready=ready)
        except UnknownLayout as exc:
            log.warning("memory: blocks could not be assembled (%s); recomputing", exc)
            return None

    def record(self, tier: Tier | None, num_tokens: int) -> None:
        if tier is None or num_tokens == 0:
            self.stats.misses += 1
            return
        self.stats.hits[tier.value] += 1
        self.stats.tokens_saved[tier.value] += num_tokens

    # --- listing ------------------------------------------------------------------------------
    def entries(self) -> list[EntryRow]:
        rows = [EntryRow(k, Tier.RAM, n, b, t) for k, n, b, t in self.ram.entries()]
        if self.disk is not None:
            self.disk.flush(timeout=10.0)  # list what is on disk, not what is about to be
            rows += [EntryRow(k, Tier.DISK, n, b, t) for k, n, b, t in self.disk.entries()]
        if self.blocks is not None:
            for c in self.blocks.conversations():
                if c.ram_bytes:
                    rows.append(EntryRow(c.key, Tier.RAM, c.num_tokens, c.ram_bytes,
                                         c.last_used, c.num_blocks, c.num_shared))
                if c.disk_bytes:
                    rows.append(EntryRow(c.key, Tier.DISK, c.num_tokens, c.disk_bytes,
                                         c.last_used, c.num_blocks, c.num_shared))
        return rows

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "hits": dict(self.stats.hits), "tokens_saved": dict(self.stats.tokens_saved),
            "misses": self.stats.misses, "ram_entries": len(self.ram),
            "snapshot_bytes_to_ram": self.stats.snapshot_bytes_to_ram,
            "snapshot_bytes_to_disk": self.stats.snapshot_bytes_to_disk,
            "ram_bytes": self.ram.num_bytes + self._block_bytes(ram=True)}
        if self.disk is not None:
            out.update(disk_entries=len(self.disk),
                       disk_bytes=self.disk.num_bytes + self._block_bytes(ram=False))
        if self.blocks is not None:
            out.update(self.blocks.summary())
        if self.shared is not None:
            out.update(self.shared.summary())
        return out

    def delete(self, key: str) -> int:
        """Forget one conversation in RAM and on disk, and in the shared tier its blocks that
        no other conversation held here uses; returns the entries removed."""
        removed = int(self.ram.remove(key))
        if self.disk is not None:
            removed += int(self.disk.remove(key))
        gone = self.blocks.remove_conversation(key) if self.blocks is not None else None
        if gone is not None:
            removed += 1
            if self.shared is not None:
                self.shared.delete(gone)
                self.shared.flush()
            if self.blocks is not None and self.blocks.files is not None:
                self.blocks.files.flush()
        return removed

    def clear(self) -> int:
        """Forget everything in RAM, on disk and in the shared tier's namespace; returns the
        entries removed here."""
        keys = {row.key for row in self.entries()}
        removed = sum(self.delete(k) for k in keys)
        if self.blocks is not None:
            self.blocks.clear()
            if self.blocks.files is not None:
                self.blocks.files.flush()  # the files are gone when this returns
        if self.shared is not None:
            self.shared.clear()
        return removed

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        if self.shared is not None:
            self.shared.close()
        if self.disk is not None:
            self.disk.close()
        if self.blocks is not None and self.blocks.files is not None:
            self.blocks.files.close()
