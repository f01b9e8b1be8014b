"""Start and stop a real redis-server (Debian's) on a free loopback port, for the cluster tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    port: int
    password: str | None
    proc: subprocess.Popen[bytes]
    log_path: Path

    def url(self, db: int = 0, password: str | None = None) -> str:
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def is_running(self) -> bool:
        return self.proc.poll() is None


def start_redis(tmp_dir: Path, password: str | None = None) -> RedisServer:
    """A redis-server with no persistence on a free loopback port, ready for commands."""
    port = free_port()
    log_path = tmp_dir / f"redis-{port}.log"
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(tmp_dir), "--logfile", str(log_path)]
    if password:
        cmd += ["--requirepass", password]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = RedisServer(port, password, proc, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        if _answers_ping(port, password):
            return server
        time.sleep(0.05)
    stop_redis(server)
    raise RuntimeError("redis-server did not answer PING")


def stop_redis(server: RedisServer) -> None:
    """Stop it by its PID (SIGTERM, then SIGKILL)."""
    if not server.is_running:
        return
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


def _answers_ping(port: int, password: str | None) -> bool:
    """A raw RESP PING (with AUTH first when there is a password): no client library needed."""
    request = b""
    if password:
        request += _command(b"AUTH", password.encode())
    request += _command(b"PING")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(request)
            reply = b""
            while b"PONG" not in reply and b"-" not in reply[:1]:
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
            return b"+PONG" in reply
    except OSError:
        return False


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
