"""Faults through the Ollama and Anthropic APIs: clients that go away, a worker that dies."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.server import MODEL, Server, kill_worker_mid_stream, wait_for

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]
OLLAMA_LONG = {"model": MODEL, "messages": STORY,
               "options": {"temperature": 0, "num_predict": 4000}}
ANTHROPIC_LONG = {"model": MODEL, "messages": STORY, "max_tokens": 4000, "temperature": 0,
                  "stream": True}


def _open_stream(server: Server, path: str, body: dict, num_lines: int) -> list[str]:
    """Read a few lines of a stream, then hang up; returns the lines read."""
    seen: list[str] = []
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{server.base_url}{path}", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while len(seen) < num_lines:
            seen.append(next(lines))
        assert server.model_status()["num_running"] == 1
    return seen


@pytest.mark.parametrize(("path", "body"), [("/api/chat", OLLAMA_LONG),
                                            ("/v1/messages", ANTHROPIC_LONG)],
                         ids=["ollama", "anthropic"])
def test_a_client_that_hangs_up_mid_stream_frees_its_sequence(server: Server, path: str,
                                                              body: dict) -> None:
    _open_stream(server, path, body, num_lines=12)
    wait_for(lambda: server.model_status()["num_running"] == 0, timeout=2.0)


def test_a_non_streaming_client_that_hangs_up_frees_its_sequence(server: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/api/chat", json={**OLLAMA_LONG, "stream": False},
                   timeout=1.0)
    wait_for(lambda: server.model_status()["num_running"] == 0, timeout=2.0)


def test_a_dying_worker_ends_an_ollama_stream_with_an_error_line(server: Server) -> None:
    lines = kill_worker_mid_stream(server, "/api/chat", OLLAMA_LONG)
    last = json.loads(lines[-1])
    assert list(last) == ["error"] and "exited unexpectedly" in last["error"]
    r = httpx.post(f"{server.base_url}/api/generate", timeout=120,
                   json={"model": MODEL, "prompt": "Hi", "stream": False,
                         "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.json()["eval_count"] > 0


def test_a_dying_worker_ends_an_anthropic_stream_with_an_error_event(server: Server) -> None:
    lines = kill_worker_mid_stream(server, "/v1/messages", ANTHROPIC_LONG)
    assert lines[-2] == "event: error"
    payload = json.loads(lines[-1].removeprefix("data: "))
    assert payload["type"] == "error" and payload["error"]["type"] == "overloaded_error"
