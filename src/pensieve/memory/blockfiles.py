"""KV blocks on disk: one checksummed file per block, written atomically by a writer thread.

    file: MAGIC | u32 header length | header JSON | tokens (int32) | KV bytes

The header names the namespace (model file + KV settings), the block's key, its parent's key,
its first position and the sequence-state layout. The parent keys are the chain index: a
restarted server rebuilds every conversation's chain from the headers alone. A block is used
only after its checksum, its key (recomputed from its parent and tokens) and its namespace
check out; anything else is deleted, never handed to llama.cpp. The same bytes are a block's
value in the shared tier (shared.py), checked by the same `open_block`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("pensieve.memory")

MAGIC = b"PNSVKB01"
SUFFIX = ".kvb"
_HEADER_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 20  # a layout names every layer


def block_key(parent: str, tokens: np.ndarray) -> str:
    """A block's key: a hash chained over its parent's key and its own tokens."""
    raw = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    return hashlib.sha256(parent.encode() + raw).hexdigest()[:32]


def encode_block(namespace: str, key: str, parent: str, start: int, tokens: np.ndarray,
                 layout: str, data: bytes) -> bytes:
    """A block as one checksummed blob: the bytes of its file, and of its shared-tier value."""
    body = np.ascontiguousarray(tokens, dtype="<i4").tobytes() + data
    header = json.dumps({"namespace": namespace, "key": key, "parent": parent, "start": start,
                         "num_tokens": len(tokens), "data_len": len(data), "layout": layout,
                         "sha256": hashlib.sha256(body).hexdigest()}).encode()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + body


@dataclass(frozen=True, slots=True)
class OpenedBlock:
    """A blob that checked out as the block it was asked for."""

    start: int
    layout: str
    data: bytes  # KV bytes


def open_block(raw: bytes, namespace: str, key: str, parent: str,
               tokens: np.ndarray) -> OpenedBlock | None:
    """The block in `raw` when it is exactly block `key` (child of `parent`, holding `tokens`)
    of `namespace`, complete and with its checksum right; else None."""
    split = _split(raw, namespace)
    if split is None:
        return None
    header, offset = split
    want = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    body = raw[offset:]
    try:
        data_len, start, layout = int(header["data_len"]), int(header["start"]), header["layout"]
    except (KeyError, TypeError, ValueError):
        return None
    if (header.get("key") != key or header.get("parent") != parent
            or not isinstance(layout, str)
            or len(body) != len(want) + data_len or body[: len(want)] != want
            or hashlib.sha256(body).hexdigest() != header.get("sha256")
            or block_key(parent, tokens) != key):
        return None
    return OpenedBlock(start, layout, body[len(want):])


@dataclass(frozen=True, slots=True)
class BlockHeader:
    key: str
    parent: str
    start: int
    tokens: np.ndarray
    layout: str  # kvstate.Layout.to_json()
    data_len: int
    path: Path


@dataclass(frozen=True, slots=True)
class _Write:
    key: str
    blob: bytes  # encode_block's


@dataclass(frozen=True, slots=True)
class _Delete:
    key: str


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event


class BlockFiles:
    """The files of one namespace's blocks under `directory/namespace/blocks/`."""

    def __init__(self, directory: Path, namespace: str) -> None:
        self.dir = directory / namespace / "blocks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.num_bytes_written = 0
        self._queue: queue.SimpleQueue[_Write | _Delete | _Barrier | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._loop, daemon=True, name="pensieve-blocks")
        self._writer.start()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    # --- writes (queued) ----------------------------------------------------------------------
    def write(self, key: str, parent: str, start: int, tokens: np.ndarray, layout: str,
              data: bytes) -> int:
        """Queue a block's file; returns its size on disk."""
        return self.write_blob(key, encode_block(self.namespace, key, parent, start, tokens,
                                                 layout, data))

    def write_blob(self, key: str, blob: bytes) -> int:
        """Queue the file of a block already encoded (`encode_block`); returns its size."""
        self._queue.put(_Write(key, blob))
        return len(blob)

    def delete(self, key: str) -> None:
        self._queue.put(_Delete(key))

    def flush(self, timeout: float = 30.0) -> None:
        done = threading.Event()
        self._queue.put(_Barrier(done))
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if isinstance(item, _Write):
                    self._write(item)
                elif isinstance(item, _Delete):
                    self.path(item.key).unlink(missing_ok=True)
                else:
                    item.done.set()
            except OSError as exc:
                log.warning("could not write a KV block to disk: %s", exc)

    def _write(self, item: _Write) -> None:
        path = self.path(item.key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(item.blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.num_bytes_written += len(item.blob)

    # --- reads --------------------------------------------------------------------------------
    def scan(self) -> list[BlockHeader]:
        """Every block file's header (no KV bytes read); unreadable files are deleted."""
        for path in self.dir.glob("*.tmp*"):
            path.unlink(missing_ok=True)  # a write that never finished
        found = []
        for path in self.dir.glob(f"*{SUFFIX}"):
            header = self._read_header(path)
            if header is None:
                log.warning("ignoring unreadable KV block %s", path.name)
                path.unlink(missing_ok=True)
            else:
                found.append(header)
        return found

    def read(self, key: str, parent: str, tokens: np.ndarray) -> bytes | None:
        """A block's KV bytes, when its file checks out as exactly this block; else None."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.flush()  # it may still be queued for writing
            try:
                raw = path.read_bytes()
            except OSError:
                return None
        except OSError:
            return None
        block = open_block(raw, self.namespace, key, parent, tokens)
        if block is None:
            log.warning("KV block %s is corrupt, truncated or foreign; recomputing", path.name)
            path.unlink(missing_ok=True)
            return None
        return block.data

    def _read_header(self, path: Path) -> BlockHeader | None:
        try:
            with open(path, "rb") as f:
                split = _split(f.read(len(MAGIC) + _HEADER_LEN.size + _MAX_HEADER),
                               self.namespace)
                if split is None:
                    return None
                h, offset = split
                num_tokens, data_len = int(h["num_tokens"]), int(h["data_len"])
                if not 0 < num_tokens <= 1 << 20 or data_len <= 0:
                    return None
                f.seek(offset)
                tokens = np.frombuffer(f.read(4 * num_tokens), dtype="<i4").astype(np.int32)
            if len(tokens) != num_tokens or block_key(str(h["parent"]), tokens) != h["key"] \
                    or path.stem != h["key"]:
                return None
            return BlockHeader(str(h["key"]), str(h["parent"]), int(h["start"]), tokens,
                               str(h["layout"]), data_len, path)
        except (OSError, ValueError, KeyError, TypeError):
            return None


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
