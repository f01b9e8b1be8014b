"""The shared tier: KV blocks in a store that many servers use (Redis; an S3 bucket could be next),
behind RAM and disk, so that any server of the same model can continue any conversation.

It holds memory's own units, the checksummed blocks of blocks.py, as the exact bytes of their
files (blockfiles.encode_block), and checks every blob with blockfiles.open_block before anything
else sees it: a blob that fails is deleted from the store and counted, never used.

    engine thread             writer thread (write behind)       reader thread (read ahead)
    save: new block -> put -> queue -> SET NX in pipelines
    prefetch(want) ---------------------------------------> chained keys past the local
                                                             chain -> GETs in one round trip
                                                             -> verified FetchedBlocks
    next look (_choose) <-- adopt into RAM <----------------/

Neither thread ever holds up the engine: a request waits for its read ahead only up to a deadline,
while other requests compute. A store that is down, slow or refusing (timeouts, auth) is a miss
and a counter, with one warning per outage and calls backed off while it lasts.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np

from pensieve.memory.blockfiles import block_key, open_block
from pensieve.memory.blocks import FetchedBlock
from pensieve.memory.shared_store import Outage, SharedBlocks, SharedStoreError

log = logging.getLogger("pensieve.memory")

T = TypeVar("T")

# A request waits for its shared-tier read at most this long, then computes instead.
READ_WAIT_S = 2.5
_BATCH_KEYS = 32  # full blocks asked for per round trip
_MAX_FETCH_BLOCKS = 512  # per read ahead (32k tokens of 64)
_MAX_TAIL_KEYS = 64  # candidate lengths of a chain's partial last block
_MAX_QUEUED_BYTES = 256 << 20  # writes waiting for the store; more are dropped (and counted)
_PUT_BATCH_BYTES = 16 << 20


@dataclass(slots=True)
class SharedStats:
    shared_hits: int = 0  # read aheads that brought at least one block
    shared_misses: int = 0  # ... that brought none (nothing there, or the store failed)
    shared_errors: int = 0  # store calls that failed
    shared_bad_blobs: int = 0  # blobs refused by the checks, and deleted
    shared_blocks_written: int = 0
    shared_bytes_written: int = 0
    shared_blocks_read: int = 0
    shared_bytes_read: int = 0
    shared_writes_dropped: int = 0  # not sent: the store was down or the queue full
    shared_write_queue: int = 0  # blocks waiting for the writer now


@dataclass(frozen=True, slots=True)
class _Put:
    key: str
    blob: bytes


@dataclass(frozen=True, slots=True)
class _Delete:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Clear:
    pass


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event


_Item = _Put | _Delete | _Clear | _Barrier
_Link = tuple[str, str, int, np.ndarray]  # a block asked for: key, parent, start, tokens


class SharedTier:
    """Write-behind and read-ahead over a SharedBlocks store, for one namespace's chains."""

    def __init__(self, store: SharedBlocks, namespace: str, seed: str,
                 block_tokens: int) -> None:
        self.store = store
        self.namespace = namespace  # what block headers must name (the memory namespace)
        self.seed = seed
        self.block_tokens = block_tokens
        self.stats = SharedStats()
        self._lock = threading.Lock()  # stats and the queue's byte count
        self._outage = Outage(store.name)
        self._queued_bytes = 0
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="pensieve-shared-read")
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="pensieve-shared-write")
        self._writer.start()

    # --- write behind (any thread puts; the writer thread sends) ------------------------------
    def put(self, key: str, blob: bytes) -> None:
        """Queue a new block for the store; dropped (and counted) while it is down or behind."""
        with self._lock:
            if self._outage.is_down() or self._queued_bytes + len(blob) > _MAX_QUEUED_BYTES:
                self.stats.shared_writes_dropped += 1
                return
            self._queued_bytes += len(blob)
            self.stats.shared_write_queue += 1
        self._queue.put(_Put(key, blob))

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self._queue.put(_Delete(tuple(keys)))

    def clear(self, timeout: float = 10.0) -> None:
        """Delete the namespace's blobs; returns when done (or after `timeout`)."""
        self._queue.put(_Clear())
        self.flush(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        done = threading.Event()
        self._queue.put(_Barrier(done))
        return done.wait(timeout)

    def _write_loop(self) -> None:
        self._call(self.store.ping)  # says at start whether the store is there
        pending: _Item | None = None
        while True:
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is None:
                return
            if isinstance(item, _Put):
                pending = self._send_puts(item)
            elif isinstance(item, _Delete):
                self._call(functools.partial(self.store.delete_many, item.keys))
            elif isinstance(item, _Clear):
                num = self._call(self.store.clear)
                if num is not None:
                    log.info("memory: %d blocks deleted from the shared tier", num)
            else:
                item.done.set()

    def _send_puts(self, first: _Put) -> _Item | None:
        """Send `first` and the puts queued behind it in one pipeline; returns the next
        item that is not a put (to handle after), if one was taken off the queue."""
        puts, size, after = [first], len(first.blob), None
        while size < _PUT_BATCH_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Put):
                after = item
                break
            puts.append(item)
            size += len(item.blob)
        written = self._call(lambda: self.store.put_many([(p.key, p.blob) for p in puts]))
        with self._lock:
            self._queued_bytes -= size
            self.stats.shared_write_queue -= len(puts)
            if written is None:
                self.stats.shared_writes_dropped += len(puts)
            else:
                self.stats.shared_blocks_written += len(puts)
                self.stats.shared_bytes_written += written
        return after

    # --- read ahead ---------------------------------------------------------------------------
    def read_ahead(self, want: np.ndarray, parent: str, start: int) -> Future[list[FetchedBlock]]:
        """Start fetching the blocks that continue the chain ending at `parent` (at position
        `start`) along `want`: full blocks while the store has them, then the longest
        partial block after them. The result is verified and never raises."""
        return self._reader.submit(self._fetch, want, parent, start)

    def _fetch(self, want: np.ndarray, parent: str, start: int) -> list[FetchedBlock]:
        found: list[FetchedBlock] = []
        ended = False  # the chain of full blocks ended (not the store failing)
        while not ended and start + self.block_tokens <= len(want) \
                and len(found) < _MAX_FETCH_BLOCKS:
            links = self._full_links(want, parent, start)
            got = self._get_chain(links)
            if got is None:
                return self._count(found)
            found += got
            ended = len(got) < len(links)
            if got:
                parent, start = got[-1].key, got[-1].start + self.block_tokens
        if ended or start + self.block_tokens > len(want):
            tail = self._get_tail(want, parent, start)
            found += tail
        return self._count(found)

    def _full_links(self, want: np.ndarray, parent: str,
                    start: int) -> list[_Link]:
        links: list[_Link] = []
        b = self.block_tokens
        while start + b <= len(want) and len(links) < _BATCH_KEYS:
            tokens = want[start : start + b]
            key = block_key(parent, tokens)
            links.append((key, parent, start, tokens))
            parent, start = key, start + b
        return links

    def _get_chain(self, links: list[_Link]
                   ) -> list[FetchedBlock] | None:
        """The leading blocks of `links` the store holds and that check out; None: it failed."""
        if not links:
            return []
        blobs = self._call(lambda: self.store.get_many([link[0] for link in links]))
        if blobs is None:
            return None
        out = []
        for link, raw in zip(links, blobs, strict=True):
            block = self._open(raw, *link) if raw is not None else None
            if block is None:
                break
            out.append(block)
        return out

    def _get_tail(self, want: np.ndarray, parent: str, start: int) -> list[FetchedBlock]:
        """The longest partial block after `parent` that `want` continues with: a chain's last
        block is partial, and its length is not known, so each candidate length is asked for."""
        longest = min(self.block_tokens - 1, len(want) - start)
        lengths = range(longest, max(0, longest - _MAX_TAIL_KEYS), -1)
        links = [(block_key(parent, want[start : start + n]), parent, start,
                  want[start : start + n]) for n in lengths]
        if not links:
            return []
        blobs = self._call(lambda: self.store.get_many([link[0] for link in links]))
        for link, raw in zip(links, blobs or [], strict=False):
            if raw is not None and (block := self._open(raw, *link)) is not None:
                return [block]
        return []

    def _open(self, raw: bytes, key: str, parent: str, start: int,
              tokens: np.ndarray) -> FetchedBlock | None:
        opened = open_block(raw, self.namespace, key, parent, tokens)
        if opened is None or opened.start != start:
            log.warning("memory: shared block %s is corrupt, truncated or foreign; deleted",
                        key)
            with self._lock:
                self.stats.shared_bad_blobs += 1
            self.delete([key])
            return None
        with self._lock:
            self.stats.shared_blocks_read += 1
            self.stats.shared_bytes_read += len(raw)
        return FetchedBlock(key, parent, start, tokens.copy(), opened.layout, opened.data)

    def _count(self, found: list[FetchedBlock]) -> list[FetchedBlock]:
        with self._lock:
            if found:
                self.stats.shared_hits += 1
            else:
                self.stats.shared_misses += 1
        return found

    # --- calls to the store -------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None when the store is down (left alone while it backs off) or fails."""
        if self._outage.is_down():
            return None
        try:
            result = fn()
        except SharedStoreError as exc:
            with self._lock:
                self.stats.shared_errors += 1
            self._outage.failed(exc)
            return None
        self._outage.succeeded()
        return result

    def summary(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.stats)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout`), then stop the threads."""
        self.flush(timeout)
        self._queue.put(None)
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._writer.join(timeout)
        self.store.close()
