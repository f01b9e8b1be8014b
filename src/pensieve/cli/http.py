"""The one HTTP client of the command line: every command that talks to a running server
(`run`, `ps`, `cache`) goes through `ApiClient` (httpx). The server is `--url`, else
`PENSIEVE_URL`, else the default; `PENSIEVE_API_KEY` is sent as a bearer token; an error body of
any API family becomes a `CliError` whose message says what went wrong."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """Something the user can fix; the message says how."""


def server_url(url: str | None = None) -> str:
    """The server to talk to: `url` (from --url), else PENSIEVE_URL, else the default."""
    return url or os.environ.get("PENSIEVE_URL") or DEFAULT_URL


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
class ApiClient:
    base_url: str
    api_key: str | None = None
    timeout: float = 600.0
    _http: httpx.Client = field(init=False)

    @classmethod
    def from_env(cls, url: str | None = None, *, timeout: float = 600.0) -> ApiClient:
        """A client for --url (or PENSIEVE_URL, or the default) with PENSIEVE_API_KEY."""
        return cls(server_url(url), os.environ.get("PENSIEVE_API_KEY") or None, timeout)

    def __post_init__(self) -> None:
        self._http = self._new_http()

    def _new_http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                            timeout=httpx.Timeout(self.timeout, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plain JSON requests -------------------------------------------------------------------
    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.request("GET", path, params)

    def delete(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.request("DELETE", path, params)

    def request(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        """The JSON body of a successful answer; a CliError for an error or no answer."""
        try:
            resp = self._http.request(method, path, params=params)
        except httpx.TransportError as exc:
            raise CliError(f"Cannot reach a Pensieve server at {self.base_url}: {exc}. "
                           "Start one with `pensieve serve`, or pass --url.") from exc
        _raise_for_error(resp)
        try:
            return resp.json()
        except ValueError as exc:
            raise CliError(f"{self.base_url}{path} answered something that is not JSON; is "
                           "this a Pensieve server?") from exc

    def is_up(self) -> bool:
        try:
            self._http.get("/v1/models", timeout=2.0)
        except httpx.TransportError:
            return False
        return True

    def is_ready(self) -> bool:
        """The server answers and has a model loaded (its /health says ok)."""
        try:
            return bool(self._http.get("/health", timeout=2.0).json().get("status") == "ok")
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def models(self) -> list[str]:
        return [m["id"] for m in self.get("/v1/models")["data"]]

    # --- streamed chat ---------------------------------------------------------------------------
    def stream_chat(self, body: dict[str, Any], stats: AnswerStats
                    ) -> Generator[str, None, None]:
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
            raise CliError(error_message(chunk))
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


def error_message(body: Any) -> str:
    """The message in an error body of any family: OpenAI and Anthropic
    (`{"error": {"message": ...}}`), Ollama (`{"error": "..."}`), FastAPI (`{"detail": ...}`)."""
    if not isinstance(body, dict):
        return str(body)
    err = body.get("error", body.get("detail"))
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err if err is not None else body)


def _raise_for_error(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        message = error_message(resp.json())
    except ValueError:
        message = resp.text or resp.reason_phrase
    if resp.status_code == 401:
        message += " Set PENSIEVE_API_KEY to the server's API key."
    raise CliError(f"{message} (HTTP {resp.status_code})")
