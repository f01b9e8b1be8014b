"""The servers under test: their command lines, and starting / stopping them safely.

Each server's command line is one template tuple below; edit it there. Placeholders:
{bench} (this folder), {repo} (the repository root), {model}, {host}, {port}, {threads},
{parallel} (llama-server's -np). PENSIEVE_BENCH_PENSIEVE and PENSIEVE_BENCH_LLAMA_SERVER
replace the two executables' paths (a worktree without its own .venv or llama.cpp build).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

log = logging.getLogger("bench.servers")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"

PENSIEVE_COMMAND: tuple[str, ...] = (
    os.environ.get("PENSIEVE_BENCH_PENSIEVE", "{repo}/.venv/bin/pensieve"), "serve",
    "--host", "{host}", "--port", "{port}",
    "--model", "{model}",
    "--threads", "{threads}",
    "--parallel", "16",
    "--ctx-size", "16384",
    *os.environ.get("PENSIEVE_BENCH_FLAGS", "").split(),
)  # fmt: skip

LLAMA_SERVER_COMMAND: tuple[str, ...] = (
    os.environ.get("PENSIEVE_BENCH_LLAMA_SERVER", "{bench}/.build/cmake/bin/llama-server"),
    "-m", "{model}",
    "-t", "{threads}", "-tb", "{threads}",
    "-np", "{parallel}",
    "-c", "16384",
    "--host", "{host}", "--port", "{port}",
)  # fmt: skip

# --interrupt_requests False: by default a waiting request makes the server cut the running
# stream short, so concurrent clients would get truncated outputs instead of queueing.
LLAMA_CPP_PYTHON_COMMAND: tuple[str, ...] = (
    "{bench}/.venv-lcp/bin/python", "-m", "llama_cpp.server",
    "--model", "{model}",
    "--n_threads", "{threads}", "--n_threads_batch", "{threads}",
    "--n_ctx", "4096",
    "--interrupt_requests", "False",
    "--host", "{host}", "--port", "{port}",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to launch one kind of server and tell when it is ready."""

    name: str
    command: tuple[str, ...]
    ready_path: str
    build_hint: str
    # The flag that points the server at its state (Pensieve's memory lives on disk and would
    # otherwise carry prompts over from earlier runs): each run gets an empty directory.
    data_dir_flag: str | None = None

    def argv(self, *, model: Path, port: int, threads: int, parallel: int) -> list[str]:
        values = {
            "bench": str(BENCH_DIR),
            "repo": str(REPO_DIR),
            "model": str(model),
            "host": HOST,
            "port": str(port),
            "threads": str(threads),
            "parallel": str(parallel),
        }
        return [part.format(**values) for part in self.command]

    @property
    def executable(self) -> Path:
        return Path(self.command[0].format(bench=BENCH_DIR, repo=REPO_DIR))

    @property
    def is_installed(self) -> bool:
        return self.executable.is_file() and os.access(self.executable, os.X_OK)


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "pensieve",
            PENSIEVE_COMMAND,
            "/health",
            "install Pensieve into the main venv: .venv/bin/pip install -e .",
            data_dir_flag="--data-dir",
        ),
        ServerSpec(
            "llama-server",
            LLAMA_SERVER_COMMAND,
            "/health",
            "build it: bash bench/build_llama_server.sh",
        ),
        ServerSpec(
            "llama-cpp-python",
            LLAMA_CPP_PYTHON_COMMAND,
            "/v1/models",  # this server has no /health
            "create its venv: bash bench/setup_lcp_venv.sh",
        ),
    )
}


class ServerNotReady(RuntimeError):
    """The server exited or did not answer its readiness probe in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, num_lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return ""


class ServerProcess:
    """A server subprocess in its own process group; always stopped on exit from `with`."""

    def __init__(self, argv: list[str], log_path: Path, port: int, ready_path: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self.base_url = f"http://{HOST}:{port}"
        self.ready_url = self.base_url + ready_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting: %s (log: %s)", " ".join(self.argv), self.log_path)
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> float:
        """Poll the readiness URL until it answers 200; return the seconds it took."""
        start = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() - start < timeout_s:
                self._check_alive()
                if self._probe(client):
                    return time.monotonic() - start
                time.sleep(0.25)
        raise ServerNotReady(f"{self.ready_url} not ready after {timeout_s:.0f} s")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def has_exited(self) -> bool:
        return self._process is None or self._process.poll() is not None

    def _probe(self, client: httpx.Client) -> bool:
        try:
            return client.get(self.ready_url).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            raise ServerNotReady(
                f"server exited with code {code}; log tail:\n{tail(self.log_path)}"
            )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL it if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:
                break
            _signal_group(process.pid, sig)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("server pid %d ignored %s", process.pid, sig.name)
        _signal_group(process.pid, signal.SIGKILL)  # reap any children left in the group
        log.info("stopped server pid %d (exit code %s)", process.pid, process.returncode)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
