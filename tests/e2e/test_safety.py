"""The server as people leave it running: keys, TLS, remote-bind refusal, deadline, metrics,
request ids in logs, SIGTERM during streams, and schemathesis over its own OpenAPI document."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from tests.support.server import MODEL, free_port, start_server, stop_server

pytestmark = pytest.mark.e2e

KEY = "test-key-123"
CHAT = "/v1/chat/completions"


def chat_body(**fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 8, "temperature": 0, **fields}


def test_keys_metrics_and_request_ids(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# keys\n{KEY}\n")
    server = start_server(tmp_path, "--api-key-file", str(key_file), "--log-format", "json",
                          "--parallel", "2", "--ctx-size", "2048", "--max-prompt-tokens", "100",
                          "--max-tokens-limit", "5")
    try:
        base = server.base_url
        with httpx.Client(base_url=base, timeout=60) as http:
            assert http.get("/health").status_code == 200  # public
            assert http.get("/v1/models").status_code == 401
            assert http.get("/metrics").status_code == 401
            good = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
            bad = OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
            with pytest.raises(AuthenticationError):
                bad.models.list()
            reply = good.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=50,
                extra_headers={"X-Request-Id": "trace-me-42"}, extra_body={"ignore_eos": True})
            assert reply.headers["x-request-id"] == "trace-me-42"
            completion = reply.parse()
            assert completion.usage.completion_tokens == 5  # --max-tokens-limit
            assert completion.choices[0].finish_reason == "length"
            long = http.post(CHAT, headers={"x-api-key": KEY}, json=chat_body(
                messages=[{"role": "user", "content": "word " * 300}]))
            assert long.status_code == 400
            assert long.json()["error"]["code"] == "prompt_too_long"
            metrics = http.get("/metrics", headers={"x-api-key": KEY}).text
        assert 'route="/v1/chat/completions",status="200"' in metrics
        assert "pensieve_time_to_first_token_seconds_count" in metrics
        assert _sample(metrics, "pensieve_output_tokens_total") >= 5
        assert _sample(metrics, "pensieve_inter_token_seconds_count") >= 4  # gaps of those 5
        assert _sample(metrics, "pensieve_batch_tokens_per_step_count") > 0
        assert _sample(metrics, "pensieve_model_loaded") == 1
    finally:
        stop_server(server)
    lines = [json.loads(ln) for ln in server.log_path.read_text().splitlines()
             if ln.startswith("{")]
    assert any(ln["logger"] == "pensieve.worker" for ln in lines)  # the worker logs JSON too
    traced = [ln for ln in lines if ln["request_id"] == "trace-me-42"]
    assert any("POST /v1/chat/completions 200" in ln["message"] for ln in traced)
    assert not any("Hi" in ln["message"].split() for ln in lines)  # no prompt text


def test_tls(tmp_path: Path, default_model: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    log = tmp_path / "tls.log"
    cmd = [sys.executable, "-m", "pensieve.cli", "serve", "--port", str(port),
           "--model", str(default_model), "--model-alias", MODEL, "--data-dir",
           str(tmp_path / "data"), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
           "--api-keys", KEY, "--parallel", "1", "--ctx-size", "1024"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=f"https://localhost:{port}", verify=trust,
                          timeout=30) as https:
            _wait_ready(https, proc)
            resp = https.post(CHAT, json=chat_body(max_tokens=2), headers={"x-api-key": KEY})
            assert resp.status_code == 200, resp.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port does not work
            httpx.get(f"http://localhost:{port}/health", timeout=5).raise_for_status()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def _wait_ready(http: httpx.Client, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            if http.get("/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_remote_bind_without_keys_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pensieve.cli", "serve", "--host", "0.0.0.0",
                           "--port", str(free_port()), "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "without API keys" in proc.stderr


def test_deadlines_for_requests_and_slow_clients(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--request-timeout", "3", "--parallel", "2",
                          "--ctx-size", "4096", "--read-timeout", "1", "--log-prompts")
    try:
        port = int(server.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert slow.recv(1024) == b""  # the server hung up on the unfinished head
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            assert b" 408 " in slow.recv(4096).split(b"\r\n")[0]  # body never completed
        resp = httpx.post(f"{server.base_url}{CHAT}", timeout=60,
                          json=chat_body(max_tokens=3000, ignore_eos=True))
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "deadline_exceeded"
        deadline = time.monotonic() + 30  # the abort reaches the worker within a step or two
        while server.model_status()["num_running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.model_status()["num_running"] == 0
        ok = httpx.post(f"{server.base_url}{CHAT}", json=chat_body(max_tokens=2), timeout=60)
        assert ok.status_code == 200
    finally:
        stop_server(server)
    assert "Tell me a story." in server.log_path.read_text()  # asked for with --log-prompts


def test_sigterm_lets_streams_finish_then_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--parallel", "4", "--ctx-size", "4096",
                          "--shutdown-timeout", "60")
    results: list[tuple[bool, str | None]] = []
    streaming = [threading.Event() for _ in range(4)]

    def stream(started: threading.Event) -> None:
        body = chat_body(max_tokens=48, ignore_eos=True, stream=True)
        finish, done = None, False
        with httpx.stream("POST", f"{server.base_url}{CHAT}", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    started.set()
                    for choice in json.loads(line[6:])["choices"]:
                        finish = choice["finish_reason"] or finish
        results.append((done, finish))

    threads = [threading.Thread(target=stream, args=(e,)) for e in streaming]
    for t in threads:
        t.start()
    for e in streaming:
        assert e.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    assert server.proc.wait(60) == 0
    assert results == [(True, "length")] * 4
    log = server.log_path.read_text()
    assert "Cancel" not in log  # nothing was cut off by the shutdown deadline


def test_sigterm_past_the_deadline_aborts_streams_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--parallel", "2", "--ctx-size", "8192",
                          "--shutdown-timeout", "1")
    first = threading.Event()
    lines: list[str] = []

    def stream() -> None:
        body = chat_body(max_tokens=6000, ignore_eos=True, stream=True)
        try:
            with httpx.stream("POST", f"{server.base_url}{CHAT}", json=body,
                              timeout=120) as resp:
                for line in resp.iter_lines():
                    first.set()
                    lines.append(line)
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=stream)
    thread.start()
    assert first.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    thread.join(60)
    assert "data: [DONE]" not in lines  # cut off, not finished


def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    # Fuzzes every operation of the server's own OpenAPI document; any 5xx fails the run.
    server = start_server(tmp_path, "--parallel", "2", "--ctx-size", "4096",
                          "--request-timeout", "60")
    exe = Path(sys.executable).with_name("schemathesis")
    try:
        proc = subprocess.run(
            [str(exe), "run", f"{server.base_url}/openapi.json", "--checks",
             "not_a_server_error", "--max-examples", "10", "--seed", "7", "--workers", "1",
             "--request-timeout", "60",
         "--max-time", "45", "--no-shrink", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=400, cwd=tmp_path)  # its cache goes there
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert server.proc.poll() is None
    finally:
        stop_server(server)
