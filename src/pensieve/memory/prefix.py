"""Memory's prefix primitives, shared by every tier: keys, longest match, retention value, tiers.

A remembered prefix is named by a hash of its token ids (never its text), matched against a new
prompt by exact token prefix, and kept or evicted by its retention value (the Pensieve paper's):

    value = tokens it saves recomputing / (seconds since last use + 1)
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from typing import TypeVar

import numpy as np

K = TypeVar("K")


class Tier(enum.StrEnum):
    """Where remembered KV lives, fastest first."""

    LIVE = "live"  # the llama context's own cells
    RAM = "ram"
    DISK = "disk"


def prefix_key(tokens: np.ndarray) -> str:
    """The name of a token prefix in every tier (no text: a hash of the token ids)."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:32]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def is_covered(tokens: np.ndarray, by: np.ndarray) -> bool:
    """True when `tokens` is a prefix of `by` (so what serves `by` serves `tokens` too)."""
    return len(tokens) <= len(by) and common_prefix(tokens, by) == len(tokens)


def longest_prefix(candidates: Iterable[tuple[K, np.ndarray]],
                   want: np.ndarray) -> tuple[K | None, int]:
    """The candidate sharing the longest prefix with `want`, and that length ((None, 0): none)."""
    best: tuple[K | None, int] = (None, 0)
    for item, tokens in candidates:
        if len(tokens) == 0 or len(want) == 0 or tokens[0] != want[0]:
            continue
        n = common_prefix(tokens, want)
        if n > best[1]:
            best = (item, n)
    return best


def retention_value(num_tokens: int, last_used: float, now: float) -> float:
    """What keeping a prefix is worth: tokens it saves recomputing, per second of idleness."""
    return num_tokens / (now - last_used + 1.0)
