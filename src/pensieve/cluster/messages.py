"""What crosses Ray between the ingress and a replica besides engine/types.py's dataclasses:
a typed error as plain data (Pensieve's exceptions take keyword arguments, which exceptions do
not survive pickling with), and a replica's status for /health. No Ray here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pensieve.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    NotFound,
    Overloaded,
    PensieveError,
    WorkerCrashed,
)

_KINDS: dict[str, type[PensieveError]] = {cls.__name__: cls for cls in (
    InvalidRequest, NotFound, ModelLoadError, WorkerCrashed, EngineError, DeadlineExceeded)}


@dataclass(frozen=True, slots=True)
class RemoteError:
    """A `PensieveError` raised in a replica, sent back as data and raised again at the
    ingress as the same type, so each API renders it in its own error shape."""

    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: PensieveError) -> RemoteError:
        return cls(type(exc).__name__, exc.message, exc.param, exc.code)

    def to_exception(self) -> PensieveError:
        if self.kind == "Overloaded":
            return Overloaded(self.message, code=self.code)
        return _KINDS.get(self.kind, EngineError)(self.message, param=self.param,
                                                  code=self.code)


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as /health shows it."""

    replica: str
    node_id: str
    node_ip: str
    pid: int  # the replica's process (its worker is a child of it)
    worker_pid: int | None
    state: str  # "ready" or "not loaded"
    num_in_flight: int
    num_running: int
    num_waiting: int
    num_restarts: int
    memory: dict[str, object] | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)
