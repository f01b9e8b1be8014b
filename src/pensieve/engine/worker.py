"""The worker process: owns one model's engine and runs its step loop.

It talks to the API server over one duplex pipe: first a `WorkerStart` (the model's config) comes
in, then requests and aborts; one `StepOutput` per step goes out. A crash in here (native or
Python) only ends this process; the API server fails the in-flight requests and starts a new
worker on the next request.

A worker can be started before its model is known (`spawn_worker`): `pensieve serve` starts one
first thing, so llama.cpp is imported and the model loaded while the API server imports its own
stack. This module is therefore light to import: the engine is imported inside the worker only.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from pensieve.engine.types import (
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResult,
    EmbedRequest,
    EmbedResult,
    EngineRequest,
    MemoryRequest,
    MemoryResult,
    RequestAccepted,
    RequestRejected,
    Shutdown,
    StepOutput,
    TokenizeRequest,
    TokenizeResult,
    WorkerFailed,
    WorkerReady,
)
from pensieve.logs import setup_logging

if TYPE_CHECKING:
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.engine import Engine

log = logging.getLogger("pensieve.worker")

_EXIT_GRACE_S = 10.0  # for a worker left running at exit to save what it holds


@dataclass(frozen=True, slots=True)
class WorkerStart:
    """The first message to a worker: what to load, and how to log."""

    config: EngineConfig
    log_level: int
    log_format: str = "text"


@dataclass(slots=True)
class WorkerProcess:
    """A started worker process and the API server's end of its pipe."""

    proc: multiprocessing.process.BaseProcess
    conn: Connection
    started: float  # time.perf_counter() when the model was given to it

    def start_loading(self, config: EngineConfig, log_level: int, log_format: str) -> None:
        self.started = time.perf_counter()
        self.conn.send(WorkerStart(config, log_level, log_format))

    def discard(self) -> None:
        """Stop a worker that is not wanted after all (before it became a served model's)."""
        self.conn.close()
        self.proc.kill()
        self.proc.join(1.0)


def spawn_worker(name: str = "pensieve-worker") -> WorkerProcess:
    """Start a worker process now; it imports the engine, then waits for a `WorkerStart`."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=run_worker, args=(child,), name=name, daemon=True)
    proc.start()
    child.close()
    atexit.register(_end_at_exit, proc, parent)
    return WorkerProcess(proc, parent, time.perf_counter())


def _end_at_exit(proc: multiprocessing.process.BaseProcess, conn: Connection) -> None:
    """A worker still running when this process exits without having stopped it (a start-up
    refusal, an error): close its pipe, so it saves what it holds and ends. The worker ignores
    SIGTERM, which is all multiprocessing's own exit handler (run after this one) would send
    before waiting for it."""
    if not proc.is_alive():
        return
    conn.close()
    proc.join(_EXIT_GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join(1.0)


def run_worker(conn: Connection) -> None:
    """Process entry point (spawned): import the engine, wait for the model's config, load it,
    report, then serve until told to stop."""
    # The API server decides when we stop, and then this process saves what memory holds and
    # flushes its disk writes. A terminal's Ctrl-C and a service manager's stop (systemd
    # signals every process of the unit) reach this process too; dying on them would lose the
    # turns not yet on disk. A server that dies outright closes the pipe, which ends us as well.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    engine_class, init_backend = import_engine()  # meanwhile the API server builds the config
    try:
        start: WorkerStart = conn.recv()
    except EOFError:  # a spare worker that was not needed
        return
    _setup_logging(start.log_level, start.log_format)
    init_backend()
    try:
        engine = engine_class(start.config)
    except Exception as exc:  # a bad model file or settings: tell the server why, then exit
        conn.send(WorkerFailed(str(exc)))
        return
    conn.send(WorkerReady(engine.info()))
    log.info("worker %d serving %s", os.getpid(), start.config.model_path)
    try:
        _serve(conn, engine)
    except (EOFError, BrokenPipeError):
        log.info("API server went away; worker exiting")
    finally:
        engine.close()


def import_engine() -> tuple[type[Engine], Callable[[], None]]:
    """Everything the worker imports beyond this module: the engine, llama.cpp's bindings and
    numpy (never the HTTP stack; tests/unit/test_worker_imports.py checks)."""
    _import_bindings_only()
    from pensieve.engine.engine import Engine
    from pensieve.engine.llama import init_backend

    return Engine, init_backend


def _import_bindings_only() -> None:
    """Make `llama_cpp` the low-level bindings alone, as the engine uses it (`C.llama_decode`).
    The package's own `__init__` also imports its high-level API (chat formats with Jinja, a
    disk cache, ...), which the engine never uses: about a third of the worker's imports.
    The package is created from its spec without running `__init__`, then given the names
    `from .llama_cpp import *` would give it."""
    if "llama_cpp" in sys.modules:
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.submodule_search_locations is None:
        return  # not a regular package: let the normal import say what is wrong
    package = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = package
    bindings = importlib.import_module("llama_cpp.llama_cpp")
    package.__dict__.update({k: v for k, v in vars(bindings).items() if not k.startswith("_")})


def _setup_logging(log_level: int, log_format: str) -> None:
    if log_format == "json":
        setup_logging(logging.getLevelName(log_level), "json")
    else:
        logging.basicConfig(
            level=log_level, format="%(asctime)s %(levelname)s %(name)s [worker] %(message)s"
        )


# A step's answers to requests (besides sequence outputs), sent in arrival order.
_Reply = (RequestAccepted | RequestRejected | TokenizeResult | DetokenizeResult | MemoryResult
          | EmbedResult)


def _serve(conn: Connection, engine: Engine) -> None:
    num_steps = 0
    while True:
        replies: list[_Reply] = []
        embeds: list[EmbedRequest] = []  # served together, after everything received
        num_received = 0
        timeout: float | None = 0.0 if engine.has_work() else None
        while conn.poll(timeout):
            msg = conn.recv()
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, EmbedRequest):
                embeds.append(msg)
            elif (reply := _handle(engine, msg)) is not None:
                replies.append(reply)
            num_received += 1
            timeout = 0.0
        if embeds:
            replies.extend(engine.embed(embeds))
        outputs = engine.step() if engine.has_work() else []
        if num_received or outputs:  # also after an abort, so the server's counters stay true
            sched = engine.scheduler
            num_steps += 1
            memory = engine.memory_summary() if num_received or num_steps % 32 == 0 else None
            conn.send(StepOutput([*replies, *outputs], sched.num_running, sched.num_waiting,
                                 engine.num_batch_tokens, memory))


def _handle(engine: Engine, msg: object) -> _Reply | None:
    if isinstance(msg, EngineRequest):
        return engine.add_request(msg)
    if isinstance(msg, AbortRequest):
        engine.abort(msg.request_id)
        return None
    if isinstance(msg, DetokenizeRequest):
        return engine.detokenize(msg.request_id, msg.tokens)
    if isinstance(msg, TokenizeRequest):
        return TokenizeResult(msg.request_id, tuple(engine.tokenize(msg.text, msg.add_special)))
    if isinstance(msg, MemoryRequest):
        if msg.delete:
            return MemoryResult(msg.request_id, num_deleted=engine.memory_delete(msg.key))
        return MemoryResult(msg.request_id, entries=engine.memory_entries())
    raise TypeError(f"unexpected message {type(msg).__name__}")
