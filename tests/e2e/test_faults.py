"""Faults a user meets: clients that go away mid-stream, a worker that dies mid-request."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from openai import OpenAI

from tests.support.server import MODEL, Server, kill_worker_mid_stream, wait_for

pytestmark = pytest.mark.e2e

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}


def test_disconnected_stream_is_freed_within_a_second(server: Server) -> None:
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{server.base_url}/v1/chat/completions", json=LONG) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.model_status()["num_running"] == 1
    closed = time.monotonic()
    wait_for(lambda: server.model_status()["num_running"] == 0, timeout=1.0)
    assert time.monotonic() - closed < 1.0


def test_disconnected_non_streaming_request_is_freed(server: Server) -> None:
    body = {**LONG, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=1.0)
    wait_for(lambda: server.model_status()["num_running"] == 0, timeout=2.0)


def test_server_survives_a_worker_that_dies_mid_request(server: Server,
                                                         client: OpenAI) -> None:
    pid = server.model_status()["pid"]
    restarts = server.model_status()["num_restarts"]
    events = kill_worker_mid_stream(server, "/v1/chat/completions", LONG)
    errors = [e for e in events if '"error"' in e]
    assert errors, events[-3:]
    assert "exited unexpectedly" in errors[0] and "signal 9" in errors[0]
    # the server itself is still up, and the next request gets a fresh worker
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None
    status = server.model_status()
    assert status["pid"] != pid and status["num_restarts"] == restarts + 1


def test_non_streaming_request_on_a_dying_worker_gets_a_503(server: Server) -> None:
    body = {**LONG, "stream": False}
    pid = server.model_status()["pid"]

    def kill_soon() -> None:
        wait_for(lambda: server.model_status()["num_running"] == 1, timeout=10)
        os.kill(pid, signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_soon)
    killer.start()
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    killer.join()
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "worker_crashed"


def test_sigterm_stops_the_server_cleanly_with_exit_0(tmp_path) -> None:
    from tests.support.server import start_server

    srv = start_server(tmp_path)
    worker = srv.model_status()["pid"]
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    wait_for(lambda: not os.path.exists(f"/proc/{worker}"), timeout=10)
