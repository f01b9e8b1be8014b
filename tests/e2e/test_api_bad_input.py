"""Bad input to the Ollama and Anthropic APIs: always a 4xx in the family's own error shape, and
the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.server import MODEL, Server

pytestmark = pytest.mark.e2e

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
GEN = {"model": MODEL, "prompt": "Hi"}
MSG = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
TOO_LONG = "lorem ipsum " * 6000  # well over the 8192-token context


def _with(base: dict, **changes: object) -> dict:
    return {**base, **changes}


def _opts(**options: object) -> dict:
    return _with(CHAT, options=options)


OLLAMA_CASES: list[tuple[str, str, object, int]] = [
    ("broken json", "/api/chat", b'{"model": ', 400),
    ("body is a list", "/api/chat", [], 400),
    ("empty body", "/api/generate", b"", 400),
    ("model is a number", "/api/chat", _with(CHAT, model=123), 400),
    ("messages is a string", "/api/chat", _with(CHAT, messages="hi"), 400),
    ("unknown role", "/api/chat", _with(CHAT, messages=[{"role": "wizard", "content": "x"}]),
     400),
    ("content is a number", "/api/chat", _with(CHAT, messages=[{"role": "user", "content": 5}]),
     400),
    ("stream is a string", "/api/chat", _with(CHAT, stream="yes"), 400),
    ("options is a string", "/api/chat", _with(CHAT, options="fast"), 400),
    ("temperature is a string", "/api/chat", _opts(temperature="hot"), 400),
    ("negative temperature", "/api/chat", _opts(temperature=-1), 400),
    ("num_predict 0", "/api/chat", _opts(num_predict=0), 400),
    ("huge num_predict", "/api/chat", _opts(num_predict=10**12), 400),
    ("top_p above 1", "/api/chat", _opts(top_p=2), 400),
    ("too many stop strings", "/api/chat", _opts(stop=[str(i) for i in range(17)]), 400),
    ("mirostat", "/api/chat", _opts(mirostat=2), 400),
    ("format xml", "/api/chat", _with(CHAT, format="xml"), 400),
    ("keep_alive nonsense", "/api/chat", _with(CHAT, keep_alive="forever"), 400),
    ("think level unknown", "/api/chat", _with(CHAT, think="ultra"), 400),
    ("tool without a function", "/api/chat", _with(CHAT, tools=[{"type": "function"}]), 400),
    ("tool with an invalid schema", "/api/chat", _with(CHAT, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": 123}}}]), 400),
    ("tool calls in a user message", "/api/chat", _with(CHAT, messages=[
        {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]), 400),
    ("unknown model", "/api/chat", _with(CHAT, model="no-such-model"), 404),
    ("template injection: range", "/api/generate",
     _with(GEN, template="{{ range .Messages }}{{ .Content }}{{ end }}"), 400),
    ("template injection: call", "/api/generate", _with(GEN, template="{{ call .Exec }}"), 400),
    ("template with unclosed if", "/api/generate",
     _with(GEN, template="{{ if .System }}{{ .System }}"), 400),
    ("negative context token", "/api/generate", _with(GEN, context=[1, -5]), 400),
    ("context token outside the vocabulary", "/api/generate", _with(GEN, context=[10**9]), 400),
    ("raw with system", "/api/generate", _with(GEN, raw=True, system="x"), 400),
    ("images", "/api/generate", _with(GEN, images=["aGVsbG8="]), 400),
    ("prompt longer than the context", "/api/generate", _with(GEN, prompt=TOO_LONG), 400),
]

ANTHROPIC_CASES: list[tuple[str, str, object, int]] = [
    ("broken json", "/v1/messages", b'{"model": "x", ', 400),
    ("body is a list", "/v1/messages", [], 400),
    ("missing max_tokens", "/v1/messages", {k: v for k, v in MSG.items() if k != "max_tokens"},
     400),
    ("max_tokens 0", "/v1/messages", _with(MSG, max_tokens=0), 400),
    ("max_tokens is a string", "/v1/messages", _with(MSG, max_tokens="10"), 400),
    ("huge max_tokens", "/v1/messages", _with(MSG, max_tokens=10**9), 400),
    ("no messages", "/v1/messages", _with(MSG, messages=[]), 400),
    ("first message from the assistant", "/v1/messages",
     _with(MSG, messages=[{"role": "assistant", "content": "x"}]), 400),
    ("system role inside messages", "/v1/messages",
     _with(MSG, messages=[{"role": "system", "content": "x"}]), 400),
    ("unknown block type", "/v1/messages",
     _with(MSG, messages=[{"role": "user", "content": [{"type": "video"}]}]), 400),
    ("image block", "/v1/messages",
     _with(MSG, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), 400),
    ("temperature above 1", "/v1/messages", _with(MSG, temperature=1.5), 400),
    ("top_p 0", "/v1/messages", _with(MSG, top_p=0), 400),
    ("negative top_k", "/v1/messages", _with(MSG, top_k=-1), 400),
    ("empty stop sequence", "/v1/messages", _with(MSG, stop_sequences=[""]), 400),
    ("too many stop sequences", "/v1/messages",
     _with(MSG, stop_sequences=[str(i) for i in range(17)]), 400),
    ("system is a number", "/v1/messages", _with(MSG, system=5), 400),
    ("stream is a string", "/v1/messages", _with(MSG, stream="true"), 400),
    ("tool with an invalid schema", "/v1/messages",
     _with(MSG, tools=[{"name": "f", "input_schema": {"type": 123}}]), 400),
    ("server tool", "/v1/messages",
     _with(MSG, tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400),
    ("tool_choice any without tools", "/v1/messages", _with(MSG, tool_choice={"type": "any"}),
     400),
    ("tool_use without its tool_result", "/v1/messages", _with(MSG, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f",
                                           "input": {}}]}]), 400),
    ("thinking budget not under max_tokens", "/v1/messages",
     _with(MSG, thinking={"type": "enabled", "budget_tokens": 1024}), 400),
    ("thinking budget under 1024", "/v1/messages",
     _with(MSG, max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 100}), 400),
    ("unknown model", "/v1/messages", _with(MSG, model="no-such-model"), 404),
    ("prompt longer than the context", "/v1/messages",
     _with(MSG, messages=[{"role": "user", "content": TOO_LONG}]), 400),
    ("count_tokens without messages", "/v1/messages/count_tokens", {"model": MODEL}, 400),
    ("count_tokens for an unknown model", "/v1/messages/count_tokens",
     {"model": "no-such-model", "messages": MSG["messages"]}, 404),
]


def _post(server: Server, path: str, body: object) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}{path}", content=raw, timeout=60,
                      headers={"content-type": "application/json"})


@pytest.mark.parametrize(("path", "body", "status"), [c[1:] for c in OLLAMA_CASES],
                         ids=[c[0] for c in OLLAMA_CASES])
def test_ollama_bad_input_is_a_4xx_in_ollama_shape(server: Server, path: str, body: object,
                                                   status: int) -> None:
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert list(payload) == ["error"] and isinstance(payload["error"], str)
    assert len(payload["error"]) > 10
    assert httpx.get(f"{server.base_url}/api/version", timeout=10).status_code == 200


@pytest.mark.parametrize(("path", "body", "status"), [c[1:] for c in ANTHROPIC_CASES],
                         ids=[c[0] for c in ANTHROPIC_CASES])
def test_anthropic_bad_input_is_a_4xx_in_anthropic_shape(server: Server, path: str,
                                                         body: object, status: int) -> None:
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["type"] == "error"
    expected = "not_found_error" if status == 404 else "invalid_request_error"
    assert payload["error"]["type"] == expected
    assert len(payload["error"]["message"]) > 10


def test_the_server_still_serves_after_the_bad_input(server: Server) -> None:
    r = _post(server, "/api/generate", _with(GEN, stream=False, options={"num_predict": 4}))
    assert r.status_code == 200 and r.json()["done"]
    m = _post(server, "/v1/messages", MSG)
    assert m.status_code == 200 and m.json()["usage"]["output_tokens"] > 0
    assert server.proc.poll() is None
