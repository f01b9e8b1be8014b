"""Start and stop the real server on the real default model; compare greedy runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pensieve.config import default_data_dir
from pensieve.store.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_path,
    ensure_default_model,
)

MODEL = DEFAULT_MODEL_NAME


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` free loopback ports, all different: their sockets stay bound until every one is
    chosen (one at a time, the kernel may hand out the same port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/health", timeout=5).json()

    def model_status(self) -> dict:
        return self.health()["models"][MODEL]

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_server(tmp_dir: Path, *extra: str, data_dir: Path | None = None,
                 embedded: bool = False) -> Server:
    """Serve the default model with its own data dir (memory tiers included) under tmp_dir:
    as `--model PATH`, or, when `embedded`, as `pensieve serve` with no model does (its file
    linked into the data dir, its store entry and recommended defaults made at start)."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    model = ensure_default_model(default_data_dir())
    data_dir = data_dir or tmp_dir / "data"
    if embedded:
        _link_default_model(model, data_dir)
    chosen = [] if embedded else ["--model", str(model), "--model-alias", MODEL]
    cmd = [sys.executable, "-m", "pensieve.cli", "serve", "--port", str(port), *chosen,
           "--data-dir", str(data_dir), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if server.health()["status"] == "ok":
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server did not become ready:\n{server.log_tail()}")


def _link_default_model(model: Path, data_dir: Path) -> None:
    target = default_model_path(data_dir)
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(model, target)
    except OSError:
        shutil.copyfile(model, target)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


# Tolerances for comparing two greedy runs of the same request that llama.cpp computed along
# different paths (alone or batched, KV restored or recomputed, other cells of a cache that holds
# other conversations); see docs/memory.md, "Determinism". Measured on the default model:
# chosen-token logprobs within 0.33 nats over 40 tokens, and the runs diverged only where the top
# two tokens were within 0.17 nats. Two runs are bit-identical only where both are computed alike
# from the same cells: on a server without memory (`exact_server`), one request after another.
LOGPROB_TOLERANCE = 0.5  # nats, for the same token at the same position
NEAR_TIE = 0.5  # nats: a diverging token must have been this close to the other run's choice


def wait_for(predicate, timeout: float) -> float:  # noqa: ANN001
    """Poll until `predicate()` holds; returns the seconds it took, fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def kill_worker_mid_stream(server: Server, path: str, body: dict) -> list[str]:
    """Stream `body` to `path`, SIGKILL the model's worker after 4 lines, and return the
    non-empty lines the stream still delivered (its end, with the error)."""
    pid = server.model_status()["pid"]
    lines: list[str] = []
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{server.base_url}{path}", json=body) as r:
        it = r.iter_lines()
        for _ in range(4):
            lines.append(next(it))
        os.kill(pid, signal.SIGKILL)
        lines.extend(it)
    return [line for line in lines if line]


def assert_same_greedy_run(a: list, b: list) -> None:
    """Two runs' logprobs.content (top_logprobs on) agree up to a near-tie divergence."""
    assert a and b
    for ea, eb in zip(a, b, strict=False):
        ta, tb = _get(ea, "token"), _get(eb, "token")
        if ta != tb:
            alts = {_get(t, "token"): _get(t, "logprob") for t in _get(ea, "top_logprobs")}
            assert tb in alts, (ta, tb)
            assert _get(ea, "logprob") - alts[tb] <= NEAR_TIE, (ta, tb)
            return
        assert abs(_get(ea, "logprob") - _get(eb, "logprob")) <= LOGPROB_TOLERANCE


def assert_text_follows_greedy_run(text: str, entries: list) -> None:
    """`text`, another greedy run's answer as a client printed it (trailing whitespace
    stripped), follows the run whose logprobs.content (top_logprobs on) is `entries`, up to a
    near-tie divergence: the same tolerance as `assert_same_greedy_run`, for clients that print
    text only."""
    data, pos = text.rstrip().encode(), 0
    for k, entry in enumerate(entries):
        token = bytes(_get(entry, "bytes"))
        if data.startswith(token, pos) and (token.strip() or pos < len(data)):
            pos += len(token)
            continue
        if pos == len(data):  # the printed text ended: what the run had left is whitespace
            rest = b"".join(bytes(_get(e, "bytes")) for e in entries[k:])
            assert not rest.strip(), (text, rest)
            return
        alts = {bytes(_get(t, "bytes")): _get(t, "logprob") for t in _get(entry, "top_logprobs")}
        near = [t for t, lp in alts.items() if t and data.startswith(t, pos)
                and _get(entry, "logprob") - lp <= NEAR_TIE]
        assert near, (data[pos:pos + 40], token)
        return
    assert pos == len(data), (text, data[pos:])


def completion_entries(logprobs: object) -> list[dict]:
    """A /v1/completions choice's `logprobs` (requested as `logprobs=k`) as the entries of
    `assert_same_greedy_run`."""
    return [{"token": token, "logprob": logprob,
             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}
            for token, logprob, top in zip(_get(logprobs, "tokens"),
                                           _get(logprobs, "token_logprobs"),
                                           _get(logprobs, "top_logprobs"), strict=True)]


def _get(entry: object, name: str):  # noqa: ANN202 - openai objects or plain dicts
    return entry[name] if isinstance(entry, dict) else getattr(entry, name)
