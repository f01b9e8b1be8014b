"""The live tier over a fake llama context: what it reuses, and what it must not."""

from __future__ import annotations

import numpy as np

from pensieve.memory.live import LiveCache
from pensieve.memory.prefix import Tier, common_prefix, longest_prefix, retention_value


class FakeKV:
    """A llama context whose memory may refuse to cut a sequence part-way (recurrent models)."""

    def __init__(self, *, can_cut: bool = True) -> None:
        self.can_cut = can_cut
        self.removed: list[tuple[int, int, int]] = []

    def seq_remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        self.removed.append((seq_id, p0, p1))
        return self.can_cut or (p0 == -1 and p1 == -1)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        pass

    def state_get(self, seq_id: int) -> bytes:
        return b"state"

    def state_get_range(self, seq_id: int, scratch: int, p0: int, p1: int) -> bytes | None:
        return None

    def state_set(self, seq_id: int, data: bytes) -> bool:
        return True


def test_a_retained_prefix_is_reused_when_the_context_can_cut_it() -> None:
    cache = LiveCache(2, FakeKV())
    got = cache.acquire(list(range(10)))
    cache.release(got.seq_id, list(range(10)))
    again = cache.acquire([*range(10), 99, 100])
    assert again.num_reused == 10 and again.tier is Tier.LIVE


def test_a_context_that_cannot_cut_a_sequence_reuses_nothing_and_keeps_nothing() -> None:
    kv = FakeKV(can_cut=False)
    cache = LiveCache(2, kv)
    got = cache.acquire(list(range(10)))
    cache.release(got.seq_id, list(range(6)))  # holds 10 positions, 6 named: the cut fails
    assert cache.num_retained_tokens == 0
    assert (got.seq_id, -1, -1) in kv.removed  # emptied rather than left half-known
    again = cache.acquire(list(range(10)))
    assert again.num_reused == 0 and again.tier is None


def test_prefix_primitives() -> None:
    a = np.arange(10, dtype=np.int32)
    assert common_prefix(a, np.array([0, 1, 2, 9], dtype=np.int32)) == 3
    found = longest_prefix([("x", a[:4]), ("y", a), ("z", a[1:])], a[:8])
    assert found == ("y", 8)
    assert longest_prefix([("x", a)], np.array([5], dtype=np.int32)) == (None, 0)
    assert retention_value(100, 0.0, 0.0) > retention_value(100, 0.0, 10.0)
    assert retention_value(100, 0.0, 5.0) > retention_value(10, 0.0, 5.0)
