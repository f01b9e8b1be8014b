"""The live tier of Pensieve's memory: token prefixes whose KV the llama context still holds.

Every seq_id of the context is either running (owned by a sequence) or free. A free seq_id may
still hold the KV of the sequence that last used it ("retained"). A new sequence takes the free
seq_id, and the prefix, that saves it the most work:

    new tokens:     [ system prompt ...... | turn 1 ..... | turn 2 (new) ]
    retained id 5:  [ system prompt ...... | turn 1 ..... ]       -> keep, compute turn 2 only
    running id 2:   [ system prompt ...... | other chat .. ]       -> copy the system prompt's
                                                                      cells, compute the rest
Matching is by exact token prefix, so reuse never changes what the model computes. With a
unified KV cache, `llama_memory_seq_cp` only tags the same cells with another seq_id, so sharing a
prefix costs no memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pensieve.memory.prefix import Tier, longest_prefix, prefix_key, retention_value

log = logging.getLogger("pensieve.memory")


class KVOps(Protocol):
    def seq_remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...

    def copy_prefix(self, src: int, dst: int, length: int) -> None: ...

    def state_get(self, seq_id: int) -> bytes: ...

    def state_get_range(self, seq_id: int, scratch: int, p0: int, p1: int) -> bytes | None: ...

    def state_set(self, seq_id: int, data: bytes) -> bool: ...


class Tiers(Protocol):
    """The slower tiers (RAM, disk) as the live cache sees them (memory/tiered.py)."""

    def stored_prefix(self, tokens: np.ndarray) -> int: ...

    def save(self, tokens: np.ndarray, data: bytes, first_pos: int = 0) -> bool: ...

    def best(self, want: np.ndarray) -> tuple[Tier, int]: ...

    def load(self, tier: Tier, want: np.ndarray) -> bytes | None: ...

    def record(self, tier: Tier | None, num_tokens: int) -> None: ...


@dataclass(slots=True)
class _Retained:
    tokens: np.ndarray
    last_used: float
    is_saved: bool = False  # already given to the slower tiers
    is_held: bool | None = None  # they hold all of it (None: not asked yet)

    def retention_value(self, now: float) -> float:
        return retention_value(len(self.tokens), self.last_used, now)


@dataclass(frozen=True, slots=True)
class Acquired:
    seq_id: int
    num_reused: int  # leading tokens whose KV is already in place for this seq_id
    tier: Tier | None = None  # where they came from (None: nowhere, computed in full)

# A slower tier's prefix must beat the live one by this many tokens to be worth a restore
# (restoring costs a few ms; computing a token about 3 ms on a 2-core CPU).
_RESTORE_MARGIN = 4


class LiveCache:
    def __init__(self, n_seq_max: int, kv: KVOps, *, enabled: bool = True,
                 tiers: Tiers | None = None) -> None:
        self.kv = kv
        self.enabled = enabled
        self.tiers = tiers if enabled else None
        self._free: list[int] = list(range(n_seq_max))
        self._retained: dict[int, _Retained] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_retained_tokens(self) -> int:
        return sum(len(r.tokens) for r in self._retained.values())

    def acquire(self, tokens: list[int], running: Iterable[tuple[int, list[int]]] = (),
                *, reuse: bool = True) -> Acquired:
        """Take a free seq_id for `tokens`, with the longest prefix of them already in its KV.

        `running` gives (seq_id, tokens with KV) of the running sequences, to copy from. At least
        the last token is always left to compute, so there are logits to sample from.
        """
        if not self._free:
            raise RuntimeError("no free seq_id")  # the scheduler checks num_free first
        limit = len(tokens) - 1
        if not (reuse and self.enabled and limit > 0):
            return Acquired(self._take(self._least_useful_free()), 0)
        want = np.asarray(tokens[:limit], dtype=np.int32)
        own_id, own_len = self._best_free(want)
        src_id, src_len = self._best_running(want, running)
        live_len = max(own_len, src_len)
        restored = self._restore(want, live_len)
        if restored is not None:
            return restored
        if own_len >= src_len and own_len > 0 and own_id is not None:
            if own_len + _RESTORE_MARGIN < len(self._retained[own_id].tokens):
                self._save(own_id)  # a branch (an edited turn): keep the old one findable
            seq_id = self._take(own_id)
            if self._trim(seq_id, own_len):
                return self._record(Acquired(seq_id, own_len, Tier.LIVE))
            return self._record(Acquired(seq_id, 0))
        seq_id = self._take(self._least_useful_free())
        if src_len > 0 and src_id is not None:
            self.kv.copy_prefix(src_id, seq_id, src_len)
            return self._record(Acquired(seq_id, src_len, Tier.LIVE))
        return self._record(Acquired(seq_id, 0))

    def _restore(self, want: np.ndarray, live_len: int) -> Acquired | None:
        """Bring back a longer prefix from RAM or disk, when one beats the live tier."""
        if self.tiers is None:
            return None
        tier, length = self.tiers.best(want)
        if length < live_len + _RESTORE_MARGIN:
            return None
        data = self.tiers.load(tier, want)
        if data is None:
            return None
        seq_id = self._take(self._least_useful_free())
        if not self.kv.state_set(seq_id, data):
            self.kv.seq_remove(seq_id)
            self._free.append(seq_id)
            return None
        if not self._trim(seq_id, length):
            self._free.append(seq_id)
            return None
        return self._record(Acquired(seq_id, length, tier))

    def _trim(self, seq_id: int, length: int) -> bool:
        """Keep only `seq_id`'s first `length` positions. A model whose memory cannot drop part
        of a sequence (recurrent state) refuses: then the sequence is emptied and False returned,
        so nothing is reused from it."""
        if self.kv.seq_remove(seq_id, length, -1):
            return True
        log.debug("memory: seq %d cannot be cut at %d tokens; recomputing instead", seq_id, length)
        self.kv.seq_remove(seq_id)
        return False

    def _record(self, acquired: Acquired) -> Acquired:
        if self.tiers is not None:
            self.tiers.record(acquired.tier, acquired.num_reused)
        return acquired

    def release(self, seq_id: int, tokens_in_kv: list[int] | None) -> None:
        """Give a seq_id back, keeping its KV for reuse when `tokens_in_kv` says what it holds."""
        if tokens_in_kv and self.enabled:
            tokens = np.asarray(tokens_in_kv, dtype=np.int32)
            if self._trim(seq_id, len(tokens)):  # keep exactly what is named
                self._retained[seq_id] = _Retained(tokens, time.monotonic(),
                                                   is_saved=self.tiers is None)
        else:
            self.kv.seq_remove(seq_id)
        self._free.append(seq_id)

    @property
    def has_unsaved(self) -> bool:
        return any(not r.is_saved for r in self._retained.values())

    def save_retained(self) -> None:
        """Give the slower tiers what only the context holds. Called when the engine is idle
        and before retained cells are dropped, so a finished turn's state is never copied on
        the path of the request that follows it."""
        for seq_id in list(self._retained):
            self._save(seq_id)

    def _save(self, seq_id: int) -> None:
        entry = self._retained[seq_id]
        if (not entry.is_saved and self.tiers is not None
                and not self._save_new_part(seq_id, entry.tokens)):
            self.tiers.save(entry.tokens, self.kv.state_get(seq_id))
        entry.is_saved = True

    def _save_new_part(self, seq_id: int, tokens: np.ndarray) -> bool:
        """Bring out of the context only the positions the tiers do not hold yet, through an
        empty seq_id: the copy then follows the new tokens, not the whole history."""
        assert self.tiers is not None
        start = self.tiers.stored_prefix(tokens)
        scratch = next((s for s in self._free if s not in self._retained), None)
        if start == 0 or start >= len(tokens) or scratch is None:
            return False
        data = self.kv.state_get_range(seq_id, scratch, start, len(tokens))
        return data is not None and self.tiers.save(tokens, data, start)

    def shed(self) -> None:
        """Drop from the context the retained KV that a slower tier holds whole.

        With a unified KV cache every token a step computes attends over all cells up to the
        highest one in use, masked or not: on the 2-core box, 15 retained conversations of
        1,000 tokens made a single stream decode 40% slower. The engine calls this on the
        steps that compute, after admitting new requests: a follow-up that arrives while the
        engine is idle still takes its KV live, and one that arrives while others run brings
        it back from RAM (llama-server clears a unified cache's idle slots into its prompt
        cache alike). KV no slower tier took (over their budgets) stays live.
        """
        if self.tiers is None:
            return
        for seq_id, entry in list(self._retained.items()):
            if entry.is_held is None:
                self._save(seq_id)
                _, length = self.tiers.best(entry.tokens)
                entry.is_held = length + _RESTORE_MARGIN >= len(entry.tokens)
            if entry.is_held:
                self._drop(seq_id)

    @property
    def num_retained(self) -> int:
        return len(self._retained)

    def entries(self) -> list[tuple[str, int]]:
        """(key, tokens) of the retained KV; keys match the RAM and disk tiers' keys."""
        return [(prefix_key(r.tokens), len(r.tokens)) for r in self._retained.values()]

    def drop_key(self, key: str) -> bool:
        for seq_id, entry in list(self._retained.items()):
            if prefix_key(entry.tokens) == key:
                self._drop(seq_id)
                return True
        return False

    def evict_one(self) -> bool:
        """Drop the retained KV of least retention value; False if nothing is retained."""
        if not self._retained:
            return False
        self._drop(self._least_valuable(self._retained), save=True)
        return True

    def _least_valuable(self, seq_ids: Iterable[int]) -> int:
        now = time.monotonic()
        return min(seq_ids, key=lambda i: self._retained[i].retention_value(now))

    def clear(self) -> None:
        for seq_id in list(self._retained):
            self._drop(seq_id)

    def _drop(self, seq_id: int, *, save: bool = False) -> None:
        if save:
            self._save(seq_id)
        del self._retained[seq_id]
        self.kv.seq_remove(seq_id)

    def _take(self, seq_id: int) -> int:
        self._free.remove(seq_id)
        if seq_id in self._retained:
            del self._retained[seq_id]
        return seq_id

    def _best_free(self, want: np.ndarray) -> tuple[int | None, int]:
        return longest_prefix(((i, r.tokens) for i, r in self._retained.items()), want)

    @staticmethod
    def _best_running(want: np.ndarray, running: Iterable[tuple[int, list[int]]]
                      ) -> tuple[int | None, int]:
        return longest_prefix(((i, np.asarray(t, dtype=np.int32)) for i, t in running
                               if t and t[0] == want[0]), want)

    def _least_useful_free(self) -> int:
        """A free seq_id holding nothing, else the one whose retained KV is worth least."""
        for seq_id in self._free:
            if seq_id not in self._retained:
                self.kv.seq_remove(seq_id)
                return seq_id
        seq_id = self._least_valuable(self._free)
        self._drop(seq_id, save=True)
        return seq_id
