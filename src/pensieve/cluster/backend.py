"""`RayBackend`: the `EngineBackend` of cluster mode, a model's Ray Serve replicas behind one
deployment handle.

    ingress (pensieve serve)                          Ray cluster
    API -> RayBackend.generate -- handle (stream) --> ConversationRouter -> EngineReplica
             <- one message per engine step -------------------------------  (EngineClient)

Each request carries `RoutingHints` (its session, its prompt's chained block hashes) for the
router. A replica that dies fails its in-flight requests with `WorkerCrashed` (a 503 in every
API's error shape, as a local worker's crash does); Serve drops it from routing and starts a
replacement. Closing a request's stream (the client hung up) cancels it in the replica.
A background task asks every replica for its status each second, for /health and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from ray import exceptions as ray_errors
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pensieve.cluster import deployment
from pensieve.cluster.messages import RemoteError, ReplicaStatus
from pensieve.cluster.options import ClusterOptions
from pensieve.cluster.replica import ReplicaSpec, StepMessage
from pensieve.cluster.routing import RoutingHints, block_hashes
from pensieve.engine.backend import EngineObserver, EngineStats, RequestOutputs
from pensieve.engine.client import RequestTiming
from pensieve.engine.config import ClientLimits, EngineConfig
from pensieve.engine.types import EmbedResult, EngineRequest, MemoryResult, ModelInfo, SeqOutput
from pensieve.errors import EngineError, PensieveError, WorkerCrashed

log = logging.getLogger("pensieve.cluster")

T = TypeVar("T")
# the replica is gone (not a failure of the request itself)
_GONE = (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.NodeDiedError)
_STATUS_PERIOD_S = 1.0
_STATUS_TIMEOUT_S = 3.0


class RayBackend:
    """One model served by Serve replicas (see the module docstring)."""

    def __init__(self, name: str, config: EngineConfig, options: ClusterOptions, *,
                 log_level: int = logging.INFO, limits: ClientLimits | None = None) -> None:
        self.name = name
        self.config = config
        self.options = options
        self.limits = limits or ClientLimits()
        self.observer: EngineObserver | None = None
        self.info: ModelInfo | None = None
        self.stats = EngineStats(replicas=[])
        self.num_in_flight = 0
        self.load_seconds: float | None = None
        self.last_active = time.monotonic()
        self.before_start: Callable[[], Awaitable[None]] | None = None  # memory is elsewhere
        self.after_start: Callable[[], None] | None = None
        self._log_level = log_level
        self._handle: DeploymentHandle[Any] | None = None
        self._start_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        replicas = self.stats.replicas or []
        return self._handle is not None and any(r.get("state") == "ready" for r in replicas)

    @property
    def pid(self) -> int | None:
        return None  # no worker in this process: /health lists each replica's

    def touch(self) -> None:
        self.last_active = time.monotonic()

    async def ensure_started(self) -> ModelInfo:
        async with self._start_lock:
            if self._handle is not None and self.info is not None:
                return self.info
            return await self._deploy()

    async def _deploy(self) -> ModelInfo:
        started = time.perf_counter()
        spec = ReplicaSpec(self.name, self.config, self.limits, self._log_level,
                           self.limits.log_format)
        self._handle = await asyncio.to_thread(deployment.deploy, spec, self.options)
        info: ModelInfo = await self._call(self._handle.model_info.remote())
        self.info = info
        self.load_seconds = time.perf_counter() - started
        await self.refresh_status()
        self._poller = asyncio.get_running_loop().create_task(self._poll_status())
        log.info("%s: %d replicas ready in %.1fs", self.name,
                 len(self.stats.replicas or []), self.load_seconds)
        return info

    async def stop(self) -> None:
        """Delete the Serve application this backend deployed (its replicas stop their
        workers on the way out)."""
        async with self._start_lock:
            if self._poller is not None:
                self._poller.cancel()
                self._poller = None
            if self._handle is not None:
                self._handle = None
                self.info = None
                await asyncio.to_thread(deployment.delete, self.name)

    async def stop_if_idle(self) -> bool:
        return False  # replicas stay; Serve's autoscaling sizes the deployment

    # --- generation ----------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> RequestOutputs:
        """As `EngineClient.generate`, from whichever replica the router picks."""
        self.num_in_flight += 1
        timing = RequestTiming(time.perf_counter(), self.name, self.observer)
        num_open = request.params.n
        try:
            response, first = await self._open(request)
            try:
                message: StepMessage | None = first
                while message is not None:
                    for item in message:
                        if isinstance(item, RemoteError):
                            raise item.to_exception()
                        if isinstance(item, SeqOutput):
                            timing.observe(item)
                            num_open -= item.finish_reason is not None
                        yield item
                    message = await anext(response, None)
            except (ray_errors.RayError, RayServeException) as exc:
                raise _crashed(self.name, exc) from None
            finally:
                if num_open > 0:
                    response.cancel()
        finally:
            self.num_in_flight -= 1
            self.touch()
            timing.log(request.request_id, aborted=num_open > 0)

    async def _open(self, request: EngineRequest
                    ) -> tuple[DeploymentResponseGenerator[Any], StepMessage]:
        """Send the request and wait for its first message. A replica that died before it
        answered anything (Serve had not noticed yet) never started the request: it is sent
        once more, and the router picks among the live replicas."""
        handle = await self._started()
        for attempt in range(2):
            response = cast(DeploymentResponseGenerator[Any],
                            handle.options(stream=True).generate.remote(
                                request, hints=hints_for(request)))
            try:
                first: StepMessage = await anext(response)
                return response, first
            except (ray_errors.RayError, RayServeException) as exc:
                if attempt > 0 or not isinstance(exc, _GONE):
                    raise _crashed(self.name, exc) from None
                log.warning("%s: a replica was gone before it accepted %s; sending it again",
                            self.name, request.request_id)
        raise AssertionError("unreachable")

    # --- one request, one answer --------------------------------------------------------------
    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        handle = await self._started()
        return await self._call(handle.tokenize.remote(text, add_special))

    async def detokenize(self, tokens: list[int]) -> str:
        handle = await self._started()
        return await self._call(handle.detokenize.remote(list(tokens)))

    async def embed(self, inputs: Sequence[str | Sequence[int]], *, truncate: bool = True
                    ) -> EmbedResult:
        handle = await self._started()
        items = [x if isinstance(x, str) else list(x) for x in inputs]
        return await self._call(handle.embed.remote(items, truncate))

    async def memory(self, *, delete: bool = False, key: str | None = None) -> MemoryResult:
        """Every replica's remembered conversations (each entry names its replica); a delete
        reaches every replica."""
        handle = await self._started()
        ids = await asyncio.to_thread(deployment.replica_ids, self.name)
        results = await asyncio.gather(*(
            self._call(handle.memory.remote(delete, key, hints=RoutingHints(replica=rid)))
            for rid in ids))
        entries = [{**entry, "replica": rid}
                   for rid, result in zip(ids, results, strict=True) for entry in result.entries]
        return MemoryResult("memory", entries, sum(r.num_deleted for r in results))

    async def _started(self) -> DeploymentHandle[Any]:
        await self.ensure_started()
        assert self._handle is not None
        return self._handle

    async def _call(self, pending: Awaitable[T | RemoteError]) -> T:
        try:
            result = await pending
        except (ray_errors.RayError, RayServeException) as exc:
            raise _crashed(self.name, exc) from None
        if isinstance(result, RemoteError):
            raise result.to_exception()
        return result

    # --- status --------------------------------------------------------------------------------
    async def _poll_status(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_PERIOD_S)
            with contextlib.suppress(Exception):  # a poll that fails is retried next time
                await self.refresh_status()

    async def refresh_status(self) -> None:
        """Ask each live replica for its status (node, pid, load, memory counters)."""
        handle = self._handle
        if handle is None:
            return
        ids = await asyncio.to_thread(deployment.replica_ids, self.name)
        answers = await asyncio.gather(*(self._status_of(handle, rid) for rid in ids))
        self.stats.replicas = answers
        ready = [a for a in answers if a.get("state") == "ready"]
        self.stats.num_running = sum(_int(a, "num_running") for a in ready)
        self.stats.num_waiting = sum(_int(a, "num_waiting") for a in ready)
        self.stats.num_restarts = sum(_int(a, "num_restarts") for a in ready)
        memories = [a["memory"] for a in ready if isinstance(a.get("memory"), dict)]
        self.stats.memory = sum_counters(memories) if memories else None  # type: ignore[arg-type]

    async def _status_of(self, handle: DeploymentHandle[Any], rid: str) -> dict[str, object]:
        response = handle.status.remote(hints=RoutingHints(replica=rid))
        try:
            status = await asyncio.wait_for(self._call(response), _STATUS_TIMEOUT_S)
        except (PensieveError, TimeoutError):
            response.cancel()
            return {"replica": rid, "state": "unreachable"}
        assert isinstance(status, ReplicaStatus)
        return status.to_json()


def hints_for(request: EngineRequest) -> RoutingHints:
    """The router's hints for a request: its session and its prompt's block hashes."""
    prompt = request.prompt if request.prompt is not None else (request.prompt_tokens or ())
    return RoutingHints(request.session_id, block_hashes(prompt))


def sum_counters(dicts: list[dict[str, object]]) -> dict[str, object]:
    """Numbers added up key by key (nested dicts too); anything else from the first."""
    total: dict[str, object] = {}
    for d in dicts:
        for key, value in d.items():
            have = total.get(key)
            if isinstance(value, bool) or key not in total:
                total[key] = sum_counters([value]) if isinstance(value, dict) else value
            elif isinstance(value, int | float) and isinstance(have, int | float):
                total[key] = have + value
            elif isinstance(value, dict) and isinstance(have, dict):
                total[key] = sum_counters([have, value])
    return total


def _int(status: dict[str, object], key: str) -> int:
    value = status.get(key)
    return value if isinstance(value, int) else 0


def _crashed(model: str, exc: Exception) -> PensieveError:
    if isinstance(exc, ray_errors.RayTaskError):  # a bug in the replica, not its death
        return EngineError(f"A replica of {model!r} failed this request: {exc}",
                           code="engine_error")
    return WorkerCrashed(
        f"The replica serving model {model!r} became unavailable while this request was in "
        f"flight ({type(exc).__name__}). It is dropped from routing and replaced; retry.",
        code="worker_crashed")
