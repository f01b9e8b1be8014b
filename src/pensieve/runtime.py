"""The models this server serves, by name, each behind its own worker process, and their
lifecycle: a model loads on first use, several stay resident within a memory budget (weights
plus a KV estimate, least recently used unloaded first), and idle ones unload after their
keep_alive.

Loading happens in the model's own backend (`EngineBackend`: a local `EngineClient` by
default, off the event loop, under that client's lock), so a model that is loading never stalls
requests to the others; only the short bookkeeping of making room takes the runtime's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pensieve.engine.backend import BackendFactory, EngineBackend, EngineObserver
from pensieve.engine.client import EngineClient
from pensieve.engine.config import ClientLimits, EngineConfig
from pensieve.engine.devices import kv_type_problem, model_shape, plan_placement
from pensieve.errors import InvalidRequest, ModelNotFound, PensieveError
from pensieve.store.durations import parse_keep_alive
from pensieve.store.gguf import GgufInfo, read_gguf
from pensieve.store.names import parse_name
from pensieve.store.netguard import NetPolicy
from pensieve.store.store import Manifest, ModelDefaults, ModelStore

log = logging.getLogger("pensieve.runtime")

_REAP_INTERVAL_S = 0.25
_WAIT_FOR_ROOM_S = 120.0

# (model path, model digest, per-model defaults) -> the worker's configuration
ConfigFactory = Callable[[str, str, ModelDefaults], EngineConfig]


def file_model_defaults(path: str) -> ModelDefaults:
    """The sampling defaults a GGUF file brings (none when it cannot be read: loading it
    reports that properly)."""
    try:
        return ModelDefaults.from_gguf(read_gguf(path))
    except (PensieveError, OSError) as exc:
        log.debug("no sampling defaults from %s: %s", path, exc)
        return ModelDefaults()


class ServiceBusy(PensieveError):
    status_code = 503
    error_type = "server_error"


@dataclass(slots=True)
class ServedModel:
    name: str
    client: EngineBackend
    created: int = field(default_factory=lambda: int(time.time()))
    digest: str | None = None
    num_weight_bytes: int = 0
    num_kv_bytes: int = 0
    num_device_bytes: int = 0  # the part of weights and KV offloaded to GPUs
    keep_alive: float | None = None  # seconds idle before unloading; None: never
    default_keep_alive: float | None = None  # for requests that do not say
    defaults: ModelDefaults = field(default_factory=ModelDefaults)  # store entry's over file's
    file_defaults: ModelDefaults = field(default_factory=ModelDefaults)  # the GGUF's own
    is_loading: bool = False

    @property
    def num_budget_bytes(self) -> int:
        """Weights and KV, wherever they are."""
        return self.num_weight_bytes + self.num_kv_bytes

    @property
    def num_host_bytes(self) -> int:
        return self.num_budget_bytes - self.num_device_bytes

    def set_footprint(self, info: GgufInfo, config: EngineConfig, device_budget: int) -> None:
        """Weights and KV (at the context's cache types) split between host and device as
        the worker will place them, for a device budget of `device_budget` bytes."""
        ctx = config.context
        shape = model_shape(info, ctx.n_ctx, ctx.type_k, ctx.type_v)
        placement = plan_placement(shape, config.gpu, device_budget)
        self.num_weight_bytes, self.num_kv_bytes = shape.weight_bytes, shape.kv_bytes
        self.num_device_bytes = placement.device_bytes

    @property
    def is_resident(self) -> bool:
        return self.is_loading or self.client.is_running

    def expires_at(self) -> float | None:
        """Wall-clock time when this model unloads if it stays idle."""
        if self.keep_alive is None or not self.client.is_running:
            return None
        idle = time.monotonic() - self.client.last_active
        return time.time() + max(0.0, self.keep_alive - idle)


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    budget_bytes: int  # host memory for weights + KV of all resident models
    max_loaded: int  # resident models at most (0: no limit)
    keep_alive: float | None  # default for models loaded on demand; None: never unload
    log_level: int = logging.INFO
    client_limits: ClientLimits | None = None  # queue bound, deadline, ... for every model
    device_budget_bytes: int = 0  # GPU memory for the offloaded part of them; 0: no GPU


class ModelRuntime:
    def __init__(self, store: ModelStore | None = None,
                 make_config: ConfigFactory | None = None,
                 lifecycle: LifecycleConfig | None = None,
                 pull_policy: NetPolicy | None = None,
                 make_backend: BackendFactory | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        self.observer: EngineObserver | None = None  # metrics; given to every client it makes
        self._aliases: dict[str, str] = {}
        self.store = store
        self.pull_policy = pull_policy or NetPolicy()  # where /api/pull may connect
        self._make_config = make_config
        self._make_backend = make_backend or _local_backend  # store models' engines
        self.lifecycle = lifecycle or LifecycleConfig(1 << 62, 0, None)
        self._room_lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()

    # --- names -------------------------------------------------------------------------------
    def add(self, name: str, client: EngineBackend, *, digest: str | None = None,
            keep_alive: float | None = None,
            defaults: ModelDefaults | None = None) -> ServedModel:
        """Serve `client` under `name` (a pinned alias, e.g. `serve --model PATH`), with
        `defaults` over those its GGUF file brings."""
        file_defaults = file_model_defaults(client.config.model_path)
        served = ServedModel(name, client, digest=digest, keep_alive=keep_alive,
                             default_keep_alive=keep_alive,
                             defaults=(defaults or ModelDefaults()).over(file_defaults),
                             file_defaults=file_defaults)
        self._estimate(served)
        self._attach(served)
        self._models[name] = served
        with contextlib.suppress(InvalidRequest):
            self._aliases[str(parse_name(name))] = name
        return served

    def names(self) -> list[str]:
        stored = [str(m.name) for m in self.store.list()] if self.store else []
        return [*self._models,
                *(n for n in stored if n not in self._models and n not in self._aliases)]

    def models(self) -> list[ServedModel]:
        """Models known so far (aliases first, then store models once used)."""
        return list(self._models.values())

    def get_or_first(self, name: str | None) -> ServedModel:
        """The named model, or the first served one for routes where the model is optional."""
        return self.get(name) if name else self.models()[0]

    def listing(self) -> list[tuple[str, ServedModel | None, Manifest | None]]:
        """Everything a client may ask for: served names, then the store's models."""
        rows: list[tuple[str, ServedModel | None, Manifest | None]] = [
            (name, served, None) for name, served in self._models.items()]
        for manifest in self.store.list() if self.store else []:
            canonical = str(manifest.name)
            if canonical not in self._models and canonical not in self._aliases:
                rows.append((str(manifest.name), None, manifest))
        return rows

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is not None:
            return served
        if not name:
            raise ModelNotFound(name, self.names())
        try:
            canonical = str(parse_name(name))
        except InvalidRequest:
            raise ModelNotFound(name, self.names()) from None
        served = self._models.get(self._aliases.get(canonical, canonical))
        if served is not None and canonical not in self._aliases and self.store is not None:
            served = self._still_stored(served)
        if served is None and self.store is not None:
            manifest = self.store.find(canonical)
            if manifest is not None:
                served = self._from_manifest(manifest)
        if served is None:
            raise ModelNotFound(name, self.names())
        return served

    def _from_manifest(self, manifest: Manifest) -> ServedModel:
        assert self.store is not None and self._make_config is not None
        path = self.store.blob_path(manifest.digest)
        config = self._make_config(str(path), manifest.digest, manifest.defaults)
        name = str(manifest.name)
        client = self._make_backend(name, config, self.lifecycle.log_level,
                                    self.lifecycle.client_limits)
        client.observer = self.observer
        file_defaults = file_model_defaults(str(path))
        served = ServedModel(name, client, created=int(manifest.created),
                             digest=manifest.digest, keep_alive=self.lifecycle.keep_alive,
                             default_keep_alive=self.lifecycle.keep_alive,
                             defaults=manifest.defaults.over(file_defaults),
                             file_defaults=file_defaults)
        served.num_weight_bytes = manifest.size
        self._attach(served)
        self._models[name] = served
        return served

    def _still_stored(self, served: ServedModel) -> ServedModel | None:
        """A store model as the store has it now (`pensieve rm`/`pull` may have changed it
        behind the server's back)."""
        assert self.store is not None
        manifest = self.store.find(served.name)
        if manifest is not None and manifest.digest == served.digest \
                and manifest.defaults.over(served.file_defaults) == served.defaults:
            return served
        self.forget(served.name)
        return None

    def forget(self, name: str) -> None:
        """Drop a store model's entry (after `rm`); unload it first if it is resident."""
        served = self._models.pop(name, None) if name not in self._aliases.values() else None
        if served is not None and served.client.pid is not None:
            task = asyncio.get_running_loop().create_task(served.client.stop())
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)

    # --- loading ---------------------------------------------------------------------------
    def _attach(self, served: ServedModel) -> None:
        async def before_start() -> None:
            await self._before_load(served)

        def after_start() -> None:
            served.is_loading = False

        served.client.before_start = before_start
        served.client.after_start = after_start

    async def _before_load(self, served: ServedModel) -> None:
        """Check the file in Python, then unload least recently used models until this one
        fits the budget."""
        path = served.client.config.model_path
        info = await asyncio.to_thread(read_gguf, path)
        problem = kv_type_problem(info, served.client.config.context.type_k,
                                  served.client.config.context.type_v)
        if problem is not None:
            raise InvalidRequest(f"Cannot load {served.name!r}: {problem}.",
                                 code="unsupported_kv_type")
        served.set_footprint(info, served.client.config, self.lifecycle.device_budget_bytes)
        if self._room_lock is None:
            self._room_lock = asyncio.Lock()
        deadline = time.monotonic() + _WAIT_FOR_ROOM_S
        async with self._room_lock:
            while not await self._make_room(served):
                if time.monotonic() > deadline:
                    raise ServiceBusy(f"No room to load {served.name!r}: the memory budget is "
                                      "taken by models that are busy. Retry later.")
                await asyncio.sleep(_REAP_INTERVAL_S)
            served.is_loading = True

    async def _make_room(self, served: ServedModel) -> bool:
        self._check_fits_alone(served)
        max_loaded = self.lifecycle.max_loaded
        while True:
            others = [m for m in self._models.values() if m is not served and m.is_resident]
            if self._fits_beside(served, others) and (not max_loaded
                                                        or len(others) < max_loaded):
                return True
            idle = [m for m in others if not m.is_loading and m.client.num_in_flight == 0]
            if not idle:
                return False
            victim = min(idle, key=lambda m: m.client.last_active)
            if await victim.client.stop_if_idle():
                log.info("unloaded %s (least recently used) to make room for %s",
                         victim.name, served.name)

    def _check_fits_alone(self, served: ServedModel) -> None:
        host, device = self.lifecycle.budget_bytes, self.lifecycle.device_budget_bytes
        if served.num_host_bytes > host:
            raise InvalidRequest(
                f"Model {served.name!r} needs about {served.num_host_bytes >> 20} MiB of host "
                f"memory (weights and KV for its context, less what goes to the GPU), more "
                f"than the whole memory budget of {host >> 20} MiB. Raise --max-memory-mb, "
                "lower its context size or a quantized --cache-type-k/-v.",
                code="model_too_large")
        if served.num_device_bytes > device:
            raise InvalidRequest(
                f"Model {served.name!r} needs about {served.num_device_bytes >> 20} MiB of GPU "
                f"memory for its offloaded layers, more than the GPU budget of {device >> 20} "
                "MiB. Lower --n-gpu-layers (or use auto), or raise --max-device-memory-mb.",
                code="model_too_large")

    def _fits_beside(self, served: ServedModel, others: list[ServedModel]) -> bool:
        """Host and device memory are budgets of their own: both must have room."""
        host = sum(m.num_host_bytes for m in others) + served.num_host_bytes
        device = sum(m.num_device_bytes for m in others) + served.num_device_bytes
        return host <= self.lifecycle.budget_bytes and device <= self.lifecycle.device_budget_bytes

    def _estimate(self, served: ServedModel) -> None:
        with contextlib.suppress(PensieveError):
            info = read_gguf(Path(served.client.config.model_path))
            served.set_footprint(info, served.client.config, self.lifecycle.device_budget_bytes)

    # --- keep_alive --------------------------------------------------------------------------
    def set_keep_alive(self, served: ServedModel, seconds: float | None) -> None:
        """How long the model stays loaded once idle: None never, 0 as soon as it is idle."""
        served.keep_alive = seconds
        served.client.touch()

    def apply_keep_alive(self, served: ServedModel, value: object | None) -> None:
        """A request's `keep_alive` (Ollama's field: seconds or '5m'; negative: forever), or
        the model's default when the request has none, as Ollama does per request."""
        seconds = served.default_keep_alive if value is None else parse_keep_alive(value)
        self.set_keep_alive(served, seconds)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(_REAP_INTERVAL_S)
            await self.reap_idle()

    async def reap_idle(self) -> None:
        now = time.monotonic()
        for served in list(self._models.values()):
            client = served.client
            if served.keep_alive is None or served.is_loading or not client.is_running:
                continue
            idle_s = now - client.last_active
            if client.num_in_flight == 0 and idle_s >= served.keep_alive \
                    and await client.stop_if_idle():
                log.info("unloaded %s: idle for %.0fs (keep_alive)", served.name, idle_s)

    # --- whole server ----------------------------------------------------------------------
    async def start_all(self) -> None:
        self._room_lock = asyncio.Lock()
        for served in self._models.values():
            await served.client.ensure_started()
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def stop_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for served in self._models.values():
            await served.client.stop()


def _local_backend(name: str, config: EngineConfig, log_level: int,
                   limits: ClientLimits | None) -> EngineBackend:
    return EngineClient(name, config, log_level=log_level, limits=limits)


def resident_bytes(pid: int | None) -> int | None:
    """A process's resident set size (Linux), for `pensieve ps`."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
