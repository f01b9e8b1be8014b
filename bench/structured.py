"""The cost of constrained decoding: output tok/s with and without a JSON schema, same prompts.

Starts Pensieve on the default model, then for each mode (free text, `json_object`, a JSON
schema) sends the same prompts at temperature 0 and `ignore_eos`-free, at concurrency 1 and 4,
and prints decode throughput (completion tokens over wall time).

    .venv/bin/python bench/structured.py [--requests 8] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30},
                    "maxItems": 4},
        "city": {"type": "string", "maxLength": 40},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "hobbies", "city", "member"],
}
MODES = {
    "free text": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
}
PEOPLE = ["a baker", "a pilot", "a student", "a gardener", "a painter", "a nurse", "a chef",
          "a teacher"]


def _start(port: int, data_dir: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pensieve.cli", "serve", "--port", str(port), "--model-alias",
           MODEL, "--data-dir", data_dir, "--parallel", "8", "--ctx-size", "8192",
           "--no-prefix-cache", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok":
                return proc
        except (httpx.HTTPError, ValueError):
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not start")


def _one(base: str, person: str, fmt: dict | None, max_tokens: int) -> int:
    body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Describe {person} as JSON."}]}
    if fmt is not None:
        body["response_format"] = fmt
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def _run(base: str, fmt: dict | None, concurrency: int, n: int, max_tokens: int
         ) -> tuple[float, int]:
    people = [PEOPLE[i % len(PEOPLE)] for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda p: _one(base, p, fmt, max_tokens), people))
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data_dir:
        proc = _start(port, str(Path(data_dir)))
        try:
            base = f"http://127.0.0.1:{port}"
            _one(base, "a cat", MODES["json_schema"], 8)  # warm up
            print("| mode | concurrency | requests | output tokens | seconds | tok/s |")
            print("|---|---|---|---|---|---|")
            for concurrency in (1, 4):
                for name, fmt in MODES.items():
                    secs, tokens = _run(base, fmt, concurrency, args.requests, args.max_tokens)
                    print(f"| {name} | {concurrency} | {args.requests} | {tokens} | "
                          f"{secs:.2f} | {tokens / secs:.1f} |", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
