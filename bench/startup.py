"""Launch to first answer: how long from starting a server until the first streamed token of a
short chat answer arrives, for `pensieve serve` and llama-server on the default model.

Each round launches every server once, alternating which goes first, and polls every 10 ms
(connection refused, or 503 while loading) until it is ready, then sends one streamed chat
request. One uncounted warm-up launch per server comes first (page cache, Python's bytecode
cache, Pensieve's digest cache: what a user's second start has). Pensieve gets one data folder
for the whole run, with the default model linked in, and its memory cleared before each launch,
so no round reuses an earlier round's KV.

    .venv/bin/python bench/startup.py [--rounds 7] [--llama-server PATH] [--json-out FILE]

llama-server is bench/.build/cmake/bin/llama-server (bash bench/build_llama_server.sh), or
--llama-server / $LLAMA_SERVER. A missing server is skipped with a hint. On a shared machine
the figures are noisy: read the medians, and wrap the run in the CPU lock
(`flock /tmp/pensieve-cpu.lock ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import BENCH_DIR, HOST, SERVERS, ServerProcess, free_port  # noqa: E402

from pensieve.config import default_data_dir  # noqa: E402
from pensieve.store.default_model import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    FILE_NAME,
    ensure_default_model,
)

LOG_DIR = BENCH_DIR / ".logs"
POLL_S = 0.01
PROMPT = "Say hello in one short sentence."
DEFAULT_LLAMA_SERVER = BENCH_DIR / ".build" / "cmake" / "bin" / "llama-server"


@dataclass(slots=True)
class Launch:
    ready_s: float  # launch -> the readiness URL answers 200
    first_token_s: float  # launch -> the first streamed token of the answer
    cpu_s: float  # CPU time the server's processes used until then (steadier on a busy box)


@dataclass(slots=True)
class ServerRuns:
    name: str
    argv: list[str]
    launches: list[Launch] = field(default_factory=list)

    def median(self, pick: Callable[[Launch], float]) -> float:
        return statistics.median(pick(x) for x in self.launches)


@dataclass(frozen=True, slots=True)
class Contender:
    """One server: how to build its command line for a port, and where it says it is ready."""

    name: str
    argv: Callable[[int], list[str]]
    ready_path: str
    model: str  # the `model` field of the chat request
    before_launch: Callable[[], None] = lambda: None


def pensieve_contender(label: str, command: str, data_dir: Path, model: Path | None,
                       threads: int | None) -> Contender:
    def argv(port: int) -> list[str]:
        extra = ["--model", str(model)] if model else []
        extra += ["--threads", str(threads)] if threads else []
        return [*shlex.split(command), "--host", HOST, "--port", str(port),
                "--data-dir", str(data_dir), *extra]

    def forget_memory() -> None:
        shutil.rmtree(data_dir / "memory", ignore_errors=True)

    # /ready: 503 until a model can serve (/health answers 200 while loading)
    if model is None:
        name = DEFAULT_MODEL_NAME
    else:
        from pensieve.cli.serve import model_name_for

        name = model_name_for(model)
    return Contender(label, argv, "/ready", name, forget_memory)


def llama_server_contender(binary: Path, model: Path, threads: int | None) -> Contender:
    def argv(port: int) -> list[str]:
        extra = ["-t", str(threads), "-tb", str(threads)] if threads else []
        return [str(binary), "-m", str(model), "--host", HOST, "--port", str(port), *extra]

    return Contender("llama-server", argv, SERVERS["llama-server"].ready_path, model.name)


def time_launch(contender: Contender, log_path: Path, timeout_s: float) -> Launch:
    contender.before_launch()
    port = free_port()
    base = f"http://{HOST}:{port}"
    server = ServerProcess(contender.argv(port), log_path, port, contender.ready_path)
    with httpx.Client(base_url=base, timeout=timeout_s, trust_env=False) as client:
        started = time.perf_counter()
        server.start()
        try:
            ready = _poll_ready(client, server, contender.ready_path, started + timeout_s)
            first = _first_token(client, contender.model)
            cpu = session_cpu_seconds(server.pid)
        finally:
            server.stop()
    return Launch(ready - started, first - started, cpu)


def session_cpu_seconds(sid: int | None) -> float:
    """User + system CPU of every process in session `sid` (the server runs in its own),
    with the children they have reaped."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if sid is not None and int(fields[3]) == sid:  # fields[0] is the state
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _poll_ready(client: httpx.Client, server: ServerProcess, path: str, deadline: float) -> float:
    while time.perf_counter() < deadline:
        try:
            if client.get(path, timeout=2.0).status_code == 200:
                return time.perf_counter()
        except httpx.TransportError:
            pass
        if server.has_exited():
            raise RuntimeError(f"{server.argv[0]} exited; log: {server.log_path}")
        time.sleep(POLL_S)
    raise RuntimeError(f"not ready in time; log: {server.log_path}")


def _first_token(client: httpx.Client, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    return time.perf_counter()
    raise RuntimeError("the answer had no content")


def print_table(runs: list[ServerRuns], num_rounds: int) -> None:
    baseline = next((r for r in runs if r.name == "llama-server" and r.launches), None)
    print(f"\nlaunch to first streamed token, median of {num_rounds} alternating rounds "
          "(shared machine: noisy)")
    header = (f"{'server':<14}{'first token s':>14}{'min':>8}{'max':>8}{'ready s':>10}"
              f"{'CPU s':>8}")
    print(header + ("  vs llama-server" if baseline else ""))
    for r in runs:
        if not r.launches:
            continue
        first = [x.first_token_s for x in r.launches]
        line = (f"{r.name:<14}{r.median(lambda x: x.first_token_s):>14.2f}{min(first):>8.2f}"
                f"{max(first):>8.2f}{r.median(lambda x: x.ready_s):>10.2f}"
                f"{r.median(lambda x: x.cpu_s):>8.2f}")
        if baseline:
            ratio = r.median(lambda x: x.first_token_s) / baseline.median(
                lambda x: x.first_token_s)
            line += f"  {ratio:>10.2f}x"
        print(line)


def default_model_file() -> Path:
    return ensure_default_model(default_data_dir())


def link_default_model(model: Path, data_dir: Path) -> None:
    """The embedded default model in a fresh data folder, as `pensieve serve` expects it."""
    target = data_dir / "default" / FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(model, target)
    except OSError:
        shutil.copyfile(model, target)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--servers", default="pensieve,llama-server")
    p.add_argument("--llama-server", type=Path,
                   default=Path(os.environ.get("LLAMA_SERVER", DEFAULT_LLAMA_SERVER)),
                   help="llama-server binary [env LLAMA_SERVER; default %(default)s]")
    p.add_argument("--pensieve-command", default=f"{sys.executable} -m pensieve.cli serve",
                   help="how to launch Pensieve [default: %(default)s]")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=COMMAND",
                   help="another Pensieve to time alongside, e.g. an older checkout: "
                        "'before=env PYTHONPATH=../old/src python -m pensieve.cli serve'")
    p.add_argument("--model", type=Path, default=None,
                   help="a GGUF for both servers [default: Pensieve's embedded default model, "
                        "which `pensieve serve` then finds on its own]")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both servers [default: each server's own default]")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per launch")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args()


def contenders(args: argparse.Namespace, data_dir: Path) -> list[Contender]:
    model = args.model or default_model_file()
    if args.model is None:
        link_default_model(model, data_dir)
    found = []
    for name in args.servers.split(","):
        if name == "pensieve":
            found.append(pensieve_contender(name, args.pensieve_command, data_dir, args.model,
                                            args.threads))
        elif name == "llama-server":
            if not (args.llama_server.is_file() and os.access(args.llama_server, os.X_OK)):
                print(f"skipping llama-server: no {args.llama_server} (build it with "
                      "`bash bench/build_llama_server.sh`, or pass --llama-server / "
                      "$LLAMA_SERVER)", file=sys.stderr)
                continue
            found.append(llama_server_contender(args.llama_server, model, args.threads))
        else:
            raise SystemExit(f"unknown server {name!r}: pensieve or llama-server")
    for item in args.also:
        label, _, command = item.partition("=")
        found.append(pensieve_contender(label, command, data_dir / label, args.model,
                                        args.threads))
        if args.model is None:
            link_default_model(model, data_dir / label)
    return found


def main() -> int:
    args = parse_args()
    # A user's Python writes bytecode caches; a development shell may have turned that off.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pensieve-startup-") as tmp:
        servers = contenders(args, Path(tmp))
        runs = [ServerRuns(c.name, c.argv(0)) for c in servers]
        for c in servers:  # warm-up, not counted
            time_launch(c, LOG_DIR / f"startup-{c.name}.log", args.timeout)
        for i in range(args.rounds):
            order = list(zip(servers, runs, strict=True))
            for c, r in order if i % 2 == 0 else reversed(order):
                r.launches.append(time_launch(c, LOG_DIR / f"startup-{c.name}.log",
                                              args.timeout))
                last = r.launches[-1]
                print(f"round {i + 1} {c.name}: first token {last.first_token_s:.2f} s "
                      f"(ready {last.ready_s:.2f} s, CPU {last.cpu_s:.2f} s)", file=sys.stderr)
    print_table(runs, args.rounds)
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
