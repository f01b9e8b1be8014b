"""The seam between the API layer and whatever runs a model.

The API (routes, `generation`, `runtime`, health, metrics, admin) talks to an `EngineBackend`
and never to a concrete engine. Two backends implement it today:

    engine/client.py     EngineClient   one local worker process over a pipe (the default)
    cluster/backend.py   RayBackend     Ray Serve replicas, each owning an EngineClient

A backend streams a request as `RequestAccepted` followed by the `SeqOutput`s of its choices,
raises Pensieve's typed errors (`InvalidRequest` for a rejected prompt, `WorkerCrashed` when
what ran the request died, `Overloaded` when it queues no more), and aborts the request when
the caller closes the stream. Everything it sends is a plain dataclass of engine/types.py.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pensieve.engine.types import (
    EmbedResult,
    EngineRequest,
    MemoryResult,
    ModelInfo,
    RequestAccepted,
    SeqOutput,
)

if TYPE_CHECKING:
    from pensieve.engine.config import ClientLimits, EngineConfig

# An async generator (not just an iterator), so callers can aclose() it to abort the request.
RequestOutputs = AsyncGenerator[SeqOutput | RequestAccepted, None]


class EngineObserver(Protocol):
    """Receives what the metrics need; every hook is called on the event loop."""

    def on_step(self, model: str, num_batch_tokens: int) -> None: ...
    def on_first_token(self, model: str, seconds: float) -> None: ...
    def on_tokens(self, model: str, num_tokens: int, gap_s: float | None) -> None: ...
    def on_finish(self, model: str, num_prompt_tokens: int) -> None: ...
    def on_rejected(self, model: str, reason: str) -> None: ...


@dataclass(slots=True)
class EngineStats:
    """What a backend last heard from its engine(s); `replicas` only where there are several
    (one entry per replica: node, pid, load, memory counters)."""

    num_running: int = 0
    num_waiting: int = 0
    num_batch_tokens: int = 0
    num_restarts: int = 0
    memory: dict[str, object] | None = None
    replicas: list[dict[str, object]] | None = None


class EngineBackend(Protocol):
    """One served model's engine, as the API layer sees it.

    Lifecycle: `ensure_started` (load, or reach, the engine; returns what the model is),
    `stop`, `stop_if_idle` (for keep_alive and the memory budget; a backend that does not
    unload returns False). `before_start` / `after_start` are the runtime's hooks around a
    load that takes local memory; a backend whose memory is elsewhere never calls them.
    """

    name: str
    config: EngineConfig
    limits: ClientLimits
    observer: EngineObserver | None
    info: ModelInfo | None
    stats: EngineStats
    num_in_flight: int
    load_seconds: float | None
    last_active: float
    before_start: Callable[[], Awaitable[None]] | None
    after_start: Callable[[], None] | None

    @property
    def is_running(self) -> bool: ...
    @property
    def pid(self) -> int | None: ...

    def touch(self) -> None: ...
    async def ensure_started(self) -> ModelInfo: ...
    async def stop(self) -> None: ...
    async def stop_if_idle(self) -> bool: ...

    def generate(self, request: EngineRequest) -> RequestOutputs:
        """`RequestAccepted`, then every choice's `SeqOutput`s until each has finished.
        Closing the generator early aborts the request."""
        ...

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...
    async def detokenize(self, tokens: list[int]) -> str: ...
    async def embed(self, inputs: Sequence[str | Sequence[int]], *, truncate: bool = True
                    ) -> EmbedResult: ...

    async def memory(self, *, delete: bool = False, key: str | None = None) -> MemoryResult:
        """List remembered conversations, or delete one (`key`) or all; a backend of several
        engines deletes in every one of them."""
        ...


# (model name, its config, log level, limits) -> a backend; the runtime makes one per model.
BackendFactory = Callable[[str, "EngineConfig", int, "ClientLimits | None"], EngineBackend]
