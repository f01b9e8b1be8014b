"""Conversation-affine routing: which replica should run a request, as pure logic.

A conversation's KV lives in the replica that ran its last turn, so its next turn should go
there. In order of preference:

    1. the session's owner: rendezvous (highest-random-weight) hashing of the session id over
       the live replicas. Every ingress computes the same owner with no shared state, and a
       replica joining or leaving moves only the sessions it wins or held (about 1/N);
       an overloaded owner (more than `max_queue` requests in flight) yields to the next
       replica in the session's own HRW order, so a busy conversation spills predictably
    2. without a session: the replica that was sent the longest prefix of the prompt, from the
       chained block hashes this router remembers per replica (a bounded LRU)
    3. else the least loaded

No Ray here (cluster/router.py adapts this to Serve's RequestRouter), so it is tested with
fake replicas in milliseconds.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_BLOCK_CHARS = 256  # characters of a rendered prompt per hashed block
DEFAULT_BLOCK_TOKENS = 64  # token ids per hashed block, for prompts given as tokens
DEFAULT_MAX_HASHES = 8192  # block hashes remembered per replica


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """What a request tells the router. `replica` pins a request to one replica (admin calls
    that must reach each: memory deletes, status); the replica refuses one meant for another."""

    session_id: str | None = None
    prefix_hashes: tuple[str, ...] = ()
    replica: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """A live replica as the router sees it: its id and requests in flight (None: unknown)."""

    replica_id: str
    num_ongoing: int | None = None

    @property
    def load(self) -> int:
        return self.num_ongoing or 0


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def block_hashes(prompt: str | Sequence[int], *, block_chars: int = DEFAULT_BLOCK_CHARS,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS) -> tuple[str, ...]:
    """Chained hashes of the prompt's full blocks: hash i covers blocks 0..i, so two prompts
    share hash i exactly when they share their first i+1 blocks. blake2b, not `hash()`: the
    same in every process and on every node."""
    if isinstance(prompt, str):
        data, size = prompt.encode("utf-8"), block_chars
    else:
        data, size = b"".join(t.to_bytes(4, "little", signed=True) for t in prompt), \
            block_tokens * 4
    hashes: list[str] = []
    chain = b""
    for start in range(0, len(data) - size + 1, size):
        chain = _digest(chain + data[start:start + size])
        hashes.append(chain.hex())
    return tuple(hashes)


def hrw_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replicas by rendezvous weight for `key`, highest first."""
    def weight(replica_id: str) -> bytes:
        return _digest(f"{key}\x00{replica_id}".encode())

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixMemory:
    """Per replica, the block hashes of prompts sent there (least recently used dropped
    first). A guess of where KV is, not a record: the replica may have evicted it."""

    def __init__(self, max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        self.max_hashes = max_hashes
        self._held: dict[str, OrderedDict[str, None]] = {}

    def remember(self, replica_id: str, hashes: Sequence[str]) -> None:
        held = self._held.setdefault(replica_id, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_hashes:
            held.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        self._held.pop(replica_id, None)

    def replica_ids(self) -> list[str]:
        return list(self._held)

    def num_blocks(self, replica_id: str, hashes: Sequence[str]) -> int:
        """How many leading blocks of `hashes` the replica was sent (chained: the deepest
        one held implies all before it)."""
        held = self._held.get(replica_id)
        if not held:
            return 0
        for i in range(len(hashes) - 1, -1, -1):
            if hashes[i] in held:
                return i + 1
        return 0


class AffinityPolicy:
    """Orders live replicas for one request (see the module docstring). Serve tries them in
    that order, skipping any whose queue is full."""

    def __init__(self, max_queue: int = 32, max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        self.max_queue = max_queue
        self.prefixes = PrefixMemory(max_hashes)

    def is_overloaded(self, replica: ReplicaLoad) -> bool:
        return replica.load > self.max_queue

    def order(self, hints: RoutingHints, replicas: Sequence[ReplicaLoad]) -> list[str]:
        if not replicas:
            return []
        ids = {r.replica_id for r in replicas}
        if hints.replica is not None and hints.replica in ids:
            return [hints.replica]
        if hints.session_id is not None:
            ranked = hrw_order(hints.session_id, ids)
        else:
            ranked = self._by_prefix_then_load(hints.prefix_hashes, replicas)
        by_id = {r.replica_id: r for r in replicas}
        ready = [i for i in ranked if not self.is_overloaded(by_id[i])]
        return ready + [i for i in ranked if self.is_overloaded(by_id[i])]

    def _by_prefix_then_load(self, hashes: Sequence[str],
                             replicas: Sequence[ReplicaLoad]) -> list[str]:
        def key(r: ReplicaLoad) -> tuple[int, int, str]:
            return (-self.prefixes.num_blocks(r.replica_id, hashes), r.load, r.replica_id)

        return [r.replica_id for r in sorted(replicas, key=key)]

    def routed(self, hints: RoutingHints, replica_id: str) -> None:
        """Note where a request went: its prompt's blocks are there now."""
        if hints.prefix_hashes:
            self.prefixes.remember(replica_id, hints.prefix_hashes)

    def replica_gone(self, replica_id: str) -> None:
        self.prefixes.forget(replica_id)

    def keep_only(self, live_ids: Iterable[str]) -> None:
        """Forget replicas no longer live (Serve replaced them)."""
        live = set(live_ids)
        for replica_id in [r for r in self.prefixes.replica_ids() if r not in live]:
            self.prefixes.forget(replica_id)
