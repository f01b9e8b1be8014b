"""The HTTP side of `pensieve run`: stream chat answers from a Pensieve (or any OpenAI-compatible)
server, and start a private server on a free loopback port when none answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class ChatError(Exception):
    """Something the user can fix; the message says how."""


@dataclass(slots=True)
class AnswerStats:
    num_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None

    def line(self) -> str:
        speed = f"{self.num_tokens / self.seconds:.1f} tok/s" if self.seconds > 0 else "- tok/s"
        return (f"{self.num_tokens} tokens · {speed} · {self.num_cached_tokens} of "
                f"{self.num_prompt_tokens} prompt tokens cached")


@dataclass(slots=True)
class ChatClient:
    base_url: str
    api_key: str | None = None
    timeout: float = 600.0
    _http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self._http = self._new_http()

    def _new_http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                            timeout=httpx.Timeout(self.timeout, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def is_up(self) -> bool:
        try:
            self._http.get("/v1/models", timeout=2.0)
        except httpx.TransportError:
            return False
        return True

    def models(self) -> list[str]:
        resp = self._http.get("/v1/models")
        _raise_for_error(resp)
        return [m["id"] for m in resp.json()["data"]]

    def stream_chat(self, body: dict[str, Any], stats: AnswerStats) -> Iterator[str]:
        """Yield the answer's text pieces; fill `stats` as the stream goes."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        started, first = time.monotonic(), None
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_error(resp)
                for chunk in _sse_events(resp.iter_lines()):
                    text = _observe(chunk, stats)
                    if text:
                        first = first if first is not None else time.monotonic()
                        yield text
                    stats.seconds = time.monotonic() - (first if first is not None else started)
        except (KeyboardInterrupt, GeneratorExit):
            # Ctrl-C can land inside httpx after the response headers arrived and before the
            # response reaches the `with`: nothing would close that connection, and the server,
            # still connected, would go on generating. Dropping every connection hangs up.
            self._http.close()
            self._http = self._new_http()
            raise


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise ChatError(_error_message(chunk))
        yield chunk


def _observe(chunk: dict[str, Any], stats: AnswerStats) -> str:
    usage = chunk.get("usage")
    if usage:
        stats.num_tokens = usage.get("completion_tokens", 0)
        stats.num_prompt_tokens = usage.get("prompt_tokens", 0)
        details = usage.get("prompt_tokens_details") or {}
        stats.num_cached_tokens = details.get("cached_tokens") or 0
    text = ""
    for choice in chunk.get("choices", []):
        text += (choice.get("delta") or {}).get("content") or ""
        stats.finish_reason = choice.get("finish_reason") or stats.finish_reason
    return text


def _error_message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message"))
    return str(err or body)


def _raise_for_error(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        message = _error_message(resp.json())
    except ValueError:
        message = resp.text or resp.reason_phrase
    if resp.status_code == 401:
        message += " Set PENSIEVE_API_KEY to the server's API key."
    raise ChatError(f"{message} (HTTP {resp.status_code})")


# --- a private server ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChatError(f"the server could not start:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if on_wait is not None:
                on_wait()
            time.sleep(0.2)
        raise ChatError(f"the server did not become ready in {timeout:.0f} s; its log: "
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
