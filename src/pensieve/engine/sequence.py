"""The state of one sequence (one choice of one request) inside the engine.

A sequence's KV catches up with its token list, vLLM-v1 style: there is no separate prefill
phase, only `num_computed` trailing `len(tokens)`.

    tokens:  [ prompt ............ | output ....... ]
              ^0                   ^num_prompt      ^len(tokens)
              |-- KV in context --|^num_computed
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.types import FinishReason, SamplingParams


class TokenSampler(Protocol):
    """One sequence's sampler, made and driven by the model runner (engine/runner.py)."""

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from the runner's context `ctx` at batch index `idx` (accepted)."""
        ...

    def close(self) -> None: ...


class SeqStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    index: int
    params: SamplingParams
    tokens: list[int]
    num_prompt: int
    max_tokens: int
    detok: IncrementalDetokenizer
    sampler: TokenSampler
    leader: Sequence | None = None  # n > 1: forks the leader's prompt KV instead of computing it
    use_cache: bool = True  # may reuse KV of earlier requests that share a prefix
    num_cached: int = 0  # prompt tokens whose KV was reused rather than computed
    seq_id: int | None = None
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    followers: list[Sequence] = field(default_factory=list)
    # While its KV is being read from disk ahead of admission: says when the read is done.
    restore_ready: Callable[[], bool] | None = None
    # The read is over the network (the shared tier): it is waited for even when nothing
    # else runs, since a restore never waits on the network (its deadline bounds the wait).
    read_is_remote: bool = False

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_pending == 1 and self.num_computed >= self.num_prompt

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def is_restore_ready(self) -> bool:
        return self.restore_ready is None or self.restore_ready()

    @property
    def waits_for_leader(self) -> bool:
        return self.leader is not None and self.num_computed == 0

    def release(self) -> None:
        self.sampler.close()
