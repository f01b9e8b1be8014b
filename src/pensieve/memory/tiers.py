"""The RAM and disk tiers of Pensieve's memory: KV snapshots of token prefixes outside the context.

A snapshot is one sequence's KV state (`llama_state_seq_get_data`) together with the exact
tokens it covers. Lookups are by longest exact token prefix. Eviction keeps what would cost the
most to recompute per second of idleness (the retention value of the Pensieve paper):

    value = tokens covered / (seconds since last use + 1)   (memory/prefix.py)

A snapshot whose tokens are a proper prefix of another's is redundant (restoring the longer one and
trimming it gives the same KV), so each tier keeps only the longest: a conversation takes one
entry, however many turns it has had.

Disk files are written atomically (temporary file, fsync, rename) and carry a checksum over
their tokens and data; a file that is truncated, tampered with or from another model/KV setting
is ignored (and removed), never restored.

    file: MAGIC | u32 header length | header JSON | tokens (int32) | state bytes
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pensieve.memory.prefix import is_covered, longest_prefix, prefix_key, retention_value

log = logging.getLogger("pensieve.memory")

MAGIC = b"PNSVKV01"
_HEADER_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16


@dataclass(slots=True)
class Snapshot:
    tokens: np.ndarray  # int32: the positions [0, len) the state covers
    data: bytes
    last_used: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return prefix_key(self.tokens)

    @property
    def num_bytes(self) -> int:
        return len(self.data) + self.tokens.nbytes

    def retention_value(self, now: float) -> float:
        return retention_value(len(self.tokens), self.last_used, now)


def _evict_order(items: dict[str, Snapshot]) -> list[str]:
    now = time.monotonic()
    return sorted(items, key=lambda k: items[k].retention_value(now))


class RamTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._items: dict[str, Snapshot] = {}
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, snap: Snapshot) -> None:
        if snap.num_bytes > self.budget_bytes:
            return
        for key, item in list(self._items.items()):
            if is_covered(snap.tokens, item.tokens) and key != snap.key:
                item.last_used = max(item.last_used, snap.last_used)
                return  # a longer snapshot already serves every lookup this one would
            if is_covered(item.tokens, snap.tokens):  # the same prefix, or a shorter one
                self.num_bytes -= self._items.pop(key).num_bytes
        self._items[snap.key] = snap
        self.num_bytes += snap.num_bytes
        for key in _evict_order(self._items):
            if self.num_bytes <= self.budget_bytes:
                break
            self.num_bytes -= self._items.pop(key).num_bytes

    def entries(self) -> list[tuple[str, int, int, float]]:
        """(key, tokens, bytes, last used) of every snapshot."""
        return [(k, len(s.tokens), s.num_bytes, s.last_used) for k, s in self._items.items()]

    def remove(self, key: str) -> bool:
        snap = self._items.pop(key, None)
        if snap is not None:
            self.num_bytes -= snap.num_bytes
        return snap is not None

    def best(self, want: np.ndarray) -> tuple[Snapshot | None, int]:
        return longest_prefix(((s, s.tokens) for s in self._items.values()), want)


@dataclass(slots=True)
class _DiskEntry:
    tokens: np.ndarray
    path: Path
    num_bytes: int
    last_used: float

    def retention_value(self, now: float) -> float:
        return retention_value(len(self.tokens), self.last_used, now)


class DiskTier:
    """Snapshots on disk under `directory/namespace/`, where the namespace names the model file's
    digest and the KV settings, so two models (or settings) never share entries."""

    def __init__(self, directory: Path, namespace: str, budget_bytes: int) -> None:
        self.dir = directory / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.budget_bytes = budget_bytes
        self._entries: dict[str, _DiskEntry] = {}
        self._lock = threading.Lock()
        self._writes: queue.SimpleQueue[Snapshot | _Barrier | None] = queue.SimpleQueue()
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                         name="pensieve-disk-tier")
        self._writer.start()

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(e.num_bytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # --- reads ------------------------------------------------------------------------------
    def entries(self) -> list[tuple[str, int, int, float]]:
        with self._lock:
            return [(k, len(e.tokens), e.num_bytes, e.last_used)
                    for k, e in self._entries.items()]

    def num_tokens(self, key: str) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return len(entry.tokens) if entry is not None else 0

    def forget(self, key: str) -> None:
        """Delete one snapshot without waiting for queued writes (none may name it)."""
        self._forget(key, remove=True)

    def remove(self, key: str) -> bool:
        self.flush()
        with self._lock:
            present = key in self._entries
        self._forget(key, remove=True)
        return present

    def best(self, want: np.ndarray) -> tuple[str | None, int]:
        with self._lock:
            return longest_prefix(((k, e.tokens) for k, e in self._entries.items()), want)

    def load(self, key: str) -> Snapshot | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        snap = self._read(entry.path)
        if snap is None:
            self._forget(key, remove=True)
            return None
        with self._lock:
            entry.last_used = time.monotonic()
        return snap

    # --- writes -----------------------------------------------------------------------------
    def put(self, snap: Snapshot) -> None:
        """Queue a snapshot for writing (a background thread writes it)."""
        self._writes.put(snap)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued snapshot is on disk."""
        done = threading.Event()
        self._writes.put(_Barrier(done))
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._writes.put(None)

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                return
            if isinstance(item, _Barrier):
                item.done.set()
                continue
            try:
                self._write(item)
            except OSError as exc:
                log.warning("could not write a KV snapshot to disk: %s", exc)

    def _write(self, snap: Snapshot) -> None:
        key = snap.key
        with self._lock:
            covered = [k for k, e in self._entries.items() if k != key
                       and is_covered(snap.tokens, e.tokens)]
            if covered:
                self._entries[covered[0]].last_used = time.monotonic()
                return  # a longer snapshot on disk already serves every lookup this one would
        path = self.dir / f"{key}.kv"
        tokens = snap.tokens.astype("<i4").tobytes()
        header = json.dumps({
            "namespace": self.namespace, "num_tokens": len(snap.tokens),
            "data_len": len(snap.data),
            "sha256": hashlib.sha256(tokens + snap.data).hexdigest(),
        }).encode()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(MAGIC + _HEADER_LEN.pack(len(header)) + header)
            f.write(tokens)
            f.write(snap.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with self._lock:
            self._entries[key] = _DiskEntry(snap.tokens, path, path.stat().st_size,
                                            time.monotonic())
            shorter = [k for k, e in self._entries.items() if k != key
                       and is_covered(e.tokens, snap.tokens)]
        for k in shorter:
            self._forget(k, remove=True)
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        with self._lock:
            now = time.monotonic()
            order = sorted(self._entries, key=lambda k: self._entries[k].retention_value(now))
            total = sum(e.num_bytes for e in self._entries.values())
        for key in order:
            if total <= self.budget_bytes:
                break
            with self._lock:
                entry = self._entries.get(key)
            if entry is not None:
                total -= entry.num_bytes
                self._forget(key, remove=True)

    def _forget(self, key: str, *, remove: bool) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None and remove:
            entry.path.unlink(missing_ok=True)

    # --- files ------------------------------------------------------------------------------
    def _scan(self) -> None:
        for path in self.dir.glob("*.tmp*"):
            path.unlink(missing_ok=True)  # a write that never finished
        for path in self.dir.glob("*.kv"):
            header = _read_header(path, self.namespace)
            if header is None:
                log.warning("ignoring unreadable KV snapshot %s", path.name)
                path.unlink(missing_ok=True)
                continue
            tokens, _ = header
            self._entries[path.stem] = _DiskEntry(tokens, path, path.stat().st_size, 0.0)

    def _read(self, path: Path) -> Snapshot | None:
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        parsed = _parse(raw, self.namespace)
        if parsed is None:
            log.warning("KV snapshot %s is corrupt or truncated; recomputing instead", path.name)
            return None
        tokens, data = parsed
        return Snapshot(tokens, data)


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event


def _split(raw: bytes, namespace: str) -> tuple[dict[str, Any], int] | None:
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + _HEADER_LEN.size:
        return None
    (header_len,) = _HEADER_LEN.unpack_from(raw, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    if header_len > _MAX_HEADER or start + header_len > len(raw):
        return None
    try:
        header = json.loads(raw[start : start + header_len])
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("namespace") != namespace:
        return None
    return header, start + header_len


def _read_header(path: Path, namespace: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _HEADER_LEN.size + _MAX_HEADER)
            split = _split(head, namespace)
            if split is None:
                return None
            header, offset = split
            num_tokens = int(header.get("num_tokens", -1))
            if num_tokens <= 0 or num_tokens > 1 << 24:
                return None
            f.seek(offset)
            tokens = np.frombuffer(f.read(4 * num_tokens), dtype="<i4")
            if len(tokens) != num_tokens:
                return None
            return tokens.astype(np.int32), header
    except (OSError, ValueError):
        return None


def _parse(raw: bytes, namespace: str) -> tuple[np.ndarray, bytes] | None:
    split = _split(raw, namespace)
    if split is None:
        return None
    header, offset = split
    try:
        num_tokens, data_len = int(header["num_tokens"]), int(header["data_len"])
    except (KeyError, TypeError, ValueError):
        return None
    end = offset + 4 * num_tokens + data_len
    if num_tokens <= 0 or data_len <= 0 or end != len(raw):
        return None
    body = raw[offset:end]
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        return None
    tokens = np.frombuffer(body[: 4 * num_tokens], dtype="<i4").astype(np.int32)
    return tokens, body[4 * num_tokens :]
