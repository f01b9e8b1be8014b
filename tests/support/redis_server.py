"""Start and stop a real redis-server (Debian's) on a free loopback port, for the cluster tests:
optionally with a password, and with TLS (a CA and a server certificate made with openssl)."""

from __future__ import annotations

import shutil
import socket
import ssl
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
    ca_file: Path | None = None  # TLS: the CA that signed the server's certificate

    def url(self, db: int = 0, password: str | None = None, *, trust: bool = True) -> str:
        """Its URL; with TLS, `trust` adds the CA (without it, the certificate is unknown)."""
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        if self.ca_file is None:
            return f"redis://{auth}127.0.0.1:{self.port}/{db}"
        query = f"?ssl_ca_certs={self.ca_file}" if trust else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}{query}"

    @property
    def is_running(self) -> bool:
        return self.proc.poll() is None


def start_redis(tmp_dir: Path, password: str | None = None, *,
                tls: bool = False) -> RedisServer:
    """A redis-server with no persistence on a free loopback port, ready for commands."""
    port = free_port()
    log_path = tmp_dir / f"redis-{port}.log"
    cmd = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_dir), "--logfile", str(log_path)]
    ca_file = None
    if tls:
        ca_file, cert, key = make_certificates(tmp_dir / f"tls-{port}")
        cmd += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca_file),
                "--tls-auth-clients", "no"]
    else:
        cmd += ["--port", str(port)]
    if password:
        cmd += ["--requirepass", password]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = RedisServer(port, password, proc, log_path, ca_file)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        if _answers_ping(port, password, ca_file):
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


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a certificate it signed for 127.0.0.1: (CA, certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=pensieve-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return ca, cert, key


def _answers_ping(port: int, password: str | None, ca_file: Path | None) -> bool:
    """A raw RESP PING (with AUTH first when there is a password): no client library needed."""
    request = b""
    if password:
        request += _command(b"AUTH", password.encode())
    request += _command(b"PING")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            s = raw
            if ca_file is not None:
                s = ssl.create_default_context(cafile=str(ca_file)).wrap_socket(
                    raw, server_hostname="127.0.0.1")
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
