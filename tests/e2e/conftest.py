"""Fixtures that run the real server on the real default model, driven by the real clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from pensieve.config import default_data_dir
from pensieve.store.default_model import DEFAULT_MODEL_NAME, ensure_default_model

MODEL = DEFAULT_MODEL_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_server(tmp_dir: Path, *extra: str) -> Server:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "pensieve.cli", "serve", "--port", str(port), *extra]
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


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="session")
def default_model() -> Path:
    return ensure_default_model(default_data_dir())


@pytest.fixture(scope="session")
def server(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"), "--parallel", "8",
                       "--ctx-size", "8192")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                  timeout=120)
