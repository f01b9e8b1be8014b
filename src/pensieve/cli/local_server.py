"""A private `pensieve serve` for `pensieve run` when no server answers: a child process on a
free loopback port, stopped with the program that started it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pensieve.cli.http import ApiClient, CliError

_POLL_S = 0.05  # readiness poll; a fast start should not wait on a slow poll


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class LocalServer:
    """`pensieve serve` in a child process on a free loopback port, stopped with this program."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(cls, serve_args: list[str]) -> LocalServer:
        port = free_port()
        log_path = Path(tempfile.mkstemp(prefix="pensieve-run-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "pensieve.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", *serve_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        return cls(proc, f"http://127.0.0.1:{port}", log_path)

    def wait_ready(self, timeout: float, on_wait: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        with ApiClient(self.url) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise CliError(f"the server could not start:\n{self.log_tail()}")
                if client.is_ready():
                    return
                if on_wait is not None:
                    on_wait()
                time.sleep(_POLL_S)
        raise CliError(f"the server did not become ready in {timeout:.0f} s; its log: "
                       f"{self.log_path}")

    def log_tail(self, num_lines: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log_path.unlink(missing_ok=True)
