"""The API server's handle on one model's worker process.

    event loop --(outbox, sender thread)--> pipe --> worker
    event loop <--(add_reader: whatever the pipe holds, cut into messages)-- pipe <-- worker

Nothing blocks the event loop: the sender thread absorbs a worker busy with a step, and the
loop reads only what the pipe already holds. If the worker dies, every request in flight gets a
`WorkerCrashed` error and the next request starts a fresh worker.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import select
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

from pensieve.engine.backend import EngineObserver, EngineStats, RequestOutputs
from pensieve.engine.config import ClientLimits, EngineConfig
from pensieve.engine.types import (
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResult,
    EmbedRequest,
    EmbedResult,
    EngineRequest,
    MemoryRequest,
    MemoryResult,
    ModelInfo,
    RequestAccepted,
    RequestRejected,
    SeqOutput,
    Shutdown,
    StepOutput,
    TokenizeRequest,
    TokenizeResult,
    WorkerFailed,
    WorkerReady,
)
from pensieve.engine.worker import WorkerProcess, spawn_worker
from pensieve.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    Overloaded,
    WorkerCrashed,
)

log = logging.getLogger("pensieve.client")

_LOAD_TIMEOUT_S = 300.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class _Crash:
    message: str




class EngineClient:
    """Starts, feeds and watches one worker process: the local `EngineBackend`."""

    def __init__(self, name: str, config: EngineConfig, *, log_level: int = logging.INFO,
                 limits: ClientLimits | None = None):
        self.name = name
        self.config = config
        self.limits = limits or ClientLimits()
        self.observer: EngineObserver | None = None
        self.num_in_flight = 0
        self.info: ModelInfo | None = None
        self.stats = EngineStats()
        self._log_level = log_level
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._spare: WorkerProcess | None = None  # already loading; see `adopt`
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._streams: dict[str, _Inbox] = {}
        self._start_lock = asyncio.Lock()
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # bumps on every (re)start, so stale threads stand down
        # lifecycle (runtime.py): make room before a load, note when it ends and last use
        self.before_start: Callable[[], Awaitable[None]] | None = None
        self.after_start: Callable[[], None] | None = None
        self.load_seconds: float | None = None
        self.last_active = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self.info is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def touch(self) -> None:
        self.last_active = time.monotonic()

    async def ensure_started(self) -> ModelInfo:
        async with self._start_lock:
            if self.is_running and self.info is not None:
                return self.info
            if self._proc is not None:
                self.stats.num_restarts += 1
                log.warning("restarting the worker for %s", self.name)
            self._loop = asyncio.get_running_loop()
            if self.before_start is not None:
                await self.before_start()
            try:
                self.info = await asyncio.to_thread(self._spawn_and_wait)
            finally:
                if self.after_start is not None:
                    self.after_start()
            self._start_threads()
            self.touch()
            return self.info

    def adopt(self, worker: WorkerProcess) -> None:
        """Load this model in `worker`, a process started earlier (`pensieve serve` starts one
        before it imports the API, so the model loads meanwhile); the next `ensure_started`
        waits for it instead of starting another."""
        worker.start_loading(self.config, self._log_level, self.limits.log_format)
        self._spare = worker

    def _spawn_and_wait(self) -> ModelInfo:
        worker, self._spare = self._spare, None
        if worker is None:
            worker = spawn_worker(f"pensieve-worker-{self.name}")
            worker.start_loading(self.config, self._log_level, self.limits.log_format)
        proc, parent, started = worker.proc, worker.conn, worker.started
        reply = _wait_for_reply(parent, proc)
        if isinstance(reply, WorkerFailed):
            proc.join(_STOP_TIMEOUT_S)
            raise ModelLoadError(f"Could not load model {self.name!r}: {reply.message}")
        assert isinstance(reply, WorkerReady)
        info = reply.info
        self.load_seconds = time.perf_counter() - started
        log.info(
            "model %s loaded from %s in %.2fs (worker pid %d): %s, %.1f MiB, n_ctx=%d, "
            "per-sequence limit=%d, parallel=%d",
            self.name, info.path, time.perf_counter() - started, proc.pid, info.description,
            info.size_bytes / 2**20, info.n_ctx, info.n_ctx_seq, info.n_seq_max,
        )
        self._proc, self._conn = proc, parent
        return info

    def _start_threads(self) -> None:
        self._generation += 1
        self._outbox = queue.SimpleQueue()
        args = (self._conn, self._outbox, self._generation)
        threading.Thread(target=self._send_loop, args=args, daemon=True,
                         name=f"pensieve-send-{self.name}").start()
        assert self._loop is not None and self._conn is not None
        # The reader holds the connection, so its descriptor stays open until it is removed.
        reader = _Reader(self._conn, self._generation)
        self._loop.add_reader(reader.fd, self._on_readable, reader)

    async def stop(self) -> None:
        """Ask the worker to exit, then make sure it has."""
        async with self._start_lock:
            await self._stop_locked()

    async def stop_if_idle(self) -> bool:
        """Unload unless a request is in flight; a request arriving meanwhile waits for the
        stop and then starts a fresh worker, instead of racing the shutdown."""
        async with self._start_lock:
            if self._streams or not self.is_running:
                return False
            await self._stop_locked()
            return True

    async def _stop_locked(self) -> None:
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        proc = self._proc
        if proc is None:
            return
        self._outbox.put(Shutdown())
        await asyncio.to_thread(proc.join, _STOP_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, _STOP_TIMEOUT_S)
        self._proc = None
        self.info = None

    # --- threads -----------------------------------------------------------------------------
    def _send_loop(self, conn: Connection, outbox: queue.SimpleQueue[object], gen: int) -> None:
        fd = conn.fileno()
        while gen == self._generation:
            msg = outbox.get()
            try:
                _write_frame(fd, pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, ValueError):
                return
            if isinstance(msg, Shutdown):
                return

    def _on_readable(self, reader: _Reader) -> None:
        """The pipe has data: one read of all it holds (one system call for a step's outputs,
        where a reader thread took two reads and a wake-up of the loop per message)."""
        try:
            messages = reader.read()
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(reader.fd)
            if reader.gen == self._generation:
                self._outbox.put(Shutdown())  # lets the sender thread end
            self._on_worker_exit(reader.gen)
            return
        for msg in messages:
            self._dispatch(msg)  # type: ignore[arg-type]

    def _dispatch(self, msg: StepOutput) -> None:
        self.stats.num_running = msg.num_running
        self.stats.num_waiting = msg.num_waiting
        self.stats.num_batch_tokens = msg.num_batch_tokens
        if self.observer is not None:
            self.observer.on_step(self.name, msg.num_batch_tokens)
        if msg.memory is not None:
            self.stats.memory = msg.memory
        for out in msg.outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _on_worker_exit(self, gen: int) -> None:
        if gen != self._generation:
            return
        proc = self._proc
        code = proc.exitcode if proc is not None else None
        if proc is not None:
            proc.join(1.0)
            code = proc.exitcode
        self.info = None
        if self._streams:
            message = (
                f"The worker serving model {self.name!r} exited unexpectedly "
                f"({_describe_exit(code)}) while this request was in flight. It is restarted "
                "on the next request; retry."
            )
            log.error("%s (%d requests failed)", message, len(self._streams))
            for stream in self._streams.values():
                stream.put_nowait(_Crash(message))

    # --- requests ----------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns():x}"

    async def generate(self, request: EngineRequest) -> RequestOutputs:
        """Stream a request's outputs: first `RequestAccepted`, then `SeqOutput`s of all choices.

        Leaving the iteration early (the client went away) aborts the request in the worker.
        This generator is the only layer between the worker's pipe and the API's renderer, so
        its per-output work is kept to a few checks.
        """
        self._admit()
        self.num_in_flight += 1
        request = self._capped(request)
        rid = request.request_id
        stream = _Inbox()
        num_open = request.params.n
        timing = RequestTiming(time.perf_counter(), self.name, self.observer)
        deadline: _Deadline | None = None
        try:
            await self.ensure_started()
            self._streams[rid] = stream
            self.touch()
            deadline = _Deadline.start(self.limits.deadline_s, stream)
            if self.limits.log_prompts:
                log.info("%s prompt: %r", rid, request.prompt or request.prompt_tokens)
            self._outbox.put(request)
            while num_open > 0:
                item = await stream.get()
                if isinstance(item, SeqOutput) and item.error is None:
                    timing.observe(item)
                    num_open -= item.finish_reason is not None
                    yield item
                    continue
                if deadline is not None:
                    deadline.check(item)
                _raise_for(item)
                assert isinstance(item, RequestAccepted)
                self._check_prompt_length(item)
                yield item
        finally:
            if deadline is not None:
                deadline.cancel()
            self.num_in_flight -= 1
            if self._streams.pop(rid, None) is not None:
                self.touch()
                if num_open > 0 and self.is_running:
                    self._outbox.put(AbortRequest(rid))
                timing.log(rid, aborted=num_open > 0)

    def _admit(self) -> None:
        limit = self.limits.max_in_flight
        if limit is not None and self.num_in_flight >= limit:
            if self.observer is not None:
                self.observer.on_rejected(self.name, "queue_full")
            raise Overloaded(
                f"Model {self.name!r} has {self.num_in_flight} requests in flight, the most "
                "it queues; retry shortly.", code="queue_full", retry_after_s=1)

    def _capped(self, request: EngineRequest) -> EngineRequest:
        cap = self.limits.max_tokens
        asked = request.params.max_tokens
        if cap is None or (asked is not None and asked <= cap):
            return request
        return replace(request, params=replace(request.params, max_tokens=cap))

    def _check_prompt_length(self, accepted: RequestAccepted) -> None:
        limit = self.limits.max_prompt_tokens
        if limit is not None and accepted.num_prompt_tokens > limit:
            raise InvalidRequest(
                f"The prompt has {accepted.num_prompt_tokens} tokens; this server accepts at "
                f"most {limit}.", param="messages", code="prompt_too_long")

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        rid = self.new_request_id("tok")
        result = await self._call(TokenizeRequest(rid, text, add_special))
        assert isinstance(result, TokenizeResult)
        return list(result.tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        result = await self._call(DetokenizeRequest(self.new_request_id("detok"), tuple(tokens)))
        assert isinstance(result, DetokenizeResult)
        return result.text

    async def memory(self, *, delete: bool = False, key: str | None = None) -> MemoryResult:
        result = await self._call(MemoryRequest(self.new_request_id("mem"), delete, key))
        assert isinstance(result, MemoryResult)
        return result

    async def embed(self, inputs: Sequence[str | Sequence[int]], *, truncate: bool = True
                    ) -> EmbedResult:
        """One normalized vector per input, computed in the worker together with any other
        embeddings requests of the same step. Bad input raises InvalidRequest (a 400)."""
        rid = self.new_request_id("emb")
        items = tuple(x if isinstance(x, str) else tuple(x) for x in inputs)
        result = await self._call(EmbedRequest(rid, items, truncate))
        assert isinstance(result, EmbedResult)
        return result

    async def _call(self, msg: TokenizeRequest | DetokenizeRequest | MemoryRequest | EmbedRequest
                    ) -> object:
        """One request, one answer (no streaming)."""
        await self.ensure_started()
        stream = _Inbox()
        self._streams[msg.request_id] = stream
        try:
            self._outbox.put(msg)
            item = await stream.get()
            _raise_for(item)
            return item
        finally:
            self._streams.pop(msg.request_id, None)


class _Inbox:
    """One request's items from the worker, in order: what `asyncio.Queue` does for a single
    consumer, at a fraction of its work per item (no task accounting, no getter queue)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _Reader:
    """Reads the worker's messages off its end of the pipe without blocking: `read` is called
    only when the pipe is readable and takes what is there, so one read may hold several
    messages or part of one. The frames are multiprocessing's (`Connection.send`: a signed
    4-byte big-endian length, or -1 and an 8-byte length, then the pickle), so the worker sends
    with a plain `Connection`; a unit test holds this reader to that framing."""

    CHUNK = 1 << 18

    def __init__(self, conn: Connection, gen: int) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.gen = gen
        self._buf = bytearray()

    def read(self) -> list[object]:
        try:
            data: bytes | bytearray = os.read(self.fd, self.CHUNK)  # the loop saw it readable
        except BlockingIOError:  # woken for nothing: the loop keeps the socket non-blocking
            return []
        if not data:
            raise EOFError
        if self._buf:
            self._buf += data
            data = self._buf
        messages: list[object] = []
        start = 0
        with memoryview(data) as view:
            while len(data) - start >= 4:
                (size,) = struct.unpack_from("!i", data, start)
                head = 4
                if size == -1:
                    if len(data) - start < 12:
                        break
                    (size,) = struct.unpack_from("!Q", data, start + 4)
                    head = 12
                end = start + head + size
                if end > len(data):
                    break
                messages.append(pickle.loads(view[start + head:end]))
                start = end
        if start == len(data):
            self._buf = bytearray()
        elif start or data is not self._buf:  # keep the part of a message not yet here
            self._buf = bytearray(memoryview(data)[start:])
        return messages


def _write_frame(fd: int, payload: bytes) -> None:
    """Send one message in multiprocessing's framing (the worker reads it with
    `Connection.recv`). The event loop watches the same socket for reading and keeps it
    non-blocking (libuv does), so a full socket is waited out here instead of failing the way
    `Connection.send` would, halfway through a message."""
    size = len(payload)
    head = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
    view = memoryview(head + payload)
    room: select.poll | None = None
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if room is None:
                room = select.poll()
                room.register(fd, select.POLLOUT)
            room.poll()


class _Deadline:
    """A timer that drops a marker into a request's stream when its time is up: the stream is
    awaited directly (no `wait_for` task per token), and the marker raises where it is read."""

    def __init__(self, seconds: float, handle: asyncio.TimerHandle):
        self.seconds = seconds
        self.handle = handle

    @classmethod
    def start(cls, seconds: float | None, stream: _Inbox) -> _Deadline | None:
        if seconds is None:
            return None
        handle = asyncio.get_running_loop().call_later(seconds, stream.put_nowait, cls)
        return cls(seconds, handle)

    def check(self, item: object) -> None:
        if item is _Deadline:
            raise DeadlineExceeded(
                f"The request did not finish within the server's deadline of "
                f"{self.seconds:g} s (--request-timeout).", code="deadline_exceeded")

    def cancel(self) -> None:
        self.handle.cancel()


@dataclass(slots=True)
class RequestTiming:
    """Per-request numbers for the log line and the metrics (no prompt text is ever logged)."""

    started: float
    model: str = ""
    observer: EngineObserver | None = None
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)  # by choice index
    num_prompt: int = 0
    num_output: int = 0

    def observe(self, out: SeqOutput) -> None:
        now = time.perf_counter()
        if self.first_token is None and out.token_ids:
            self.first_token = now
            if self.observer is not None:
                self.observer.on_first_token(self.model, now - self.started)
        self.num_prompt = out.num_prompt_tokens
        self.num_output += len(out.token_ids)
        if out.token_ids:
            last = self.last_token.get(out.index)
            if self.observer is not None:
                gap = None if last is None else now - last
                self.observer.on_tokens(self.model, len(out.token_ids), gap)
            self.last_token[out.index] = now

    def log(self, rid: str, *, aborted: bool) -> None:
        if self.observer is not None:
            self.observer.on_finish(self.model, self.num_prompt)
        if self.first_token is None:
            return
        now = time.perf_counter()
        decode_s = now - self.first_token
        rate = (self.num_output - 1) / decode_s if decode_s > 0 and self.num_output > 1 else 0.0
        log.info("%s %s: prompt %d tok, output %d tok, first token %.0f ms, %.1f tok/s",
                 rid, "aborted" if aborted else "done", self.num_prompt, self.num_output,
                 (self.first_token - self.started) * 1000, rate)


def _raise_for(item: object) -> None:
    if isinstance(item, _Crash):
        raise WorkerCrashed(item.message, code="worker_crashed")
    if isinstance(item, RequestRejected):
        raise InvalidRequest(item.message, param=item.param, code=item.code)
    if isinstance(item, SeqOutput) and item.error is not None:
        raise EngineError(item.error, code="engine_error")


def _wait_for_reply(conn: Connection, proc: multiprocessing.process.BaseProcess) -> object:
    deadline = time.monotonic() + _LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if conn.poll(0.1):
            try:
                return conn.recv()
            except EOFError:
                break
        if not proc.is_alive():
            break
    proc.join(1.0)
    if proc.is_alive():
        proc.kill()
        raise ModelLoadError(f"the model worker did not load within {_LOAD_TIMEOUT_S:.0f}s")
    raise ModelLoadError(
        f"the model worker exited while loading the model ({_describe_exit(proc.exitcode)}); "
        "the file may be corrupt or not a model llama.cpp supports"
    )


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
