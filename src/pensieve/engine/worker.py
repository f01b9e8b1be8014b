"""The worker process: owns one model's engine and runs its step loop.

It talks to the API server over one duplex pipe: requests and aborts come in, one `StepOutput`
per step goes out. A crash in here (native or Python) only ends this process; the API server
fails the in-flight requests and starts a new worker on the next request.
"""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection

from pensieve.engine.engine import Engine, EngineConfig
from pensieve.engine.llama import init_backend
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

log = logging.getLogger("pensieve.worker")


def run_worker(conn: Connection, config: EngineConfig, log_level: int,
               log_format: str = "text") -> None:
    """Process entry point (spawned): load the model, report, then serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when we stop
    if log_format == "json":
        setup_logging(logging.getLevelName(log_level), "json")
    else:
        logging.basicConfig(
            level=log_level, format="%(asctime)s %(levelname)s %(name)s [worker] %(message)s"
        )
    init_backend()
    try:
        engine = Engine(config)
    except Exception as exc:  # a bad model file or settings: tell the server why, then exit
        conn.send(WorkerFailed(str(exc)))
        return
    conn.send(WorkerReady(engine.info()))
    log.info("worker %d serving %s", os.getpid(), config.model_path)
    try:
        _serve(conn, engine)
    except (EOFError, BrokenPipeError):
        log.info("API server went away; worker exiting")
    finally:
        engine.close()


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
