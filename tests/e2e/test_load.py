"""A bounded loopback load test: 64 concurrent clients, streaming and not, some leaving early.

Only 200s and the documented 503 (queue full, with Retry-After) may come back; afterwards no
sequence is left running and the processes' memory has not kept growing. The duration is
PENSIEVE_LOAD_SECONDS (default 40: the suite's budget; raise it for a soak).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support.server import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.e2e

NUM_CLIENTS = 64
DURATION_S = float(os.environ.get("PENSIEVE_LOAD_SECONDS", "40"))
CHAT = "/v1/chat/completions"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def one_request(http: httpx.AsyncClient, rng: random.Random, seen: Counter) -> None:
    kind = rng.choice(["plain", "stream", "stream-leave", "plain-leave"])
    body = {"model": MODEL, "max_tokens": rng.randint(4, 24), "temperature": 0.7,
            "messages": [{"role": "user", "content": f"Count to {rng.randint(3, 99)}."}],
            "stream": kind.startswith("stream")}
    if kind == "plain-leave":
        try:  # a client that gives up before the answer: the server must abort its work
            resp = await http.post(CHAT, json=body, timeout=0.05)
        except httpx.TimeoutException:
            seen["left"] += 1
            return
        seen[resp.status_code] += 1
        if resp.status_code == 503:
            await asyncio.sleep(float(resp.headers["retry-after"]))
        return
    async with http.stream("POST", CHAT, json=body) as resp:
        seen[resp.status_code] += 1
        if resp.status_code == 503:  # queue full: back off as told, like a real client
            await resp.aread()
            assert resp.json()["error"]["code"] == "queue_full"
            await asyncio.sleep(float(resp.headers["retry-after"]))
            return
        assert resp.status_code == 200, (await resp.aread())[:300]
        num_lines = 0
        async for _line in resp.aiter_lines():
            num_lines += 1
            if kind == "stream-leave" and num_lines >= 3:
                seen["left"] += 1
                return  # leaves mid-stream


async def client_loop(base_url: str, seed: int, until: float, seen: Counter) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        while asyncio.get_running_loop().time() < until:
            await one_request(http, rng, seen)


async def run_load(base_url: str, seconds: float) -> Counter:
    seen: Counter = Counter()
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(client_loop(base_url, i, until, seen) for i in range(NUM_CLIENTS)))
    return seen


def settled_status(server: Server) -> dict:
    """The model's status once the last aborts have reached the worker."""
    deadline = time.monotonic() + 30
    status = server.model_status()
    while status["num_running"] + status["num_waiting"] > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = server.model_status()
    return status


def test_64_clients_mixed_load(tmp_path: Path) -> None:
    # A small RAM tier: it fills up during the warm-up, so any growth after that is a leak
    # (every answer is remembered, and at temperature 0.7 nearly every one is new).
    server = start_server(tmp_path, "--parallel", "8", "--ctx-size", "4096",
                          "--max-queue", "24", "--memory-ram-mb", "32")
    try:
        worker = server.model_status()["pid"]
        asyncio.run(run_load(server.base_url, DURATION_S / 4))  # warm-up: buffers, caches
        before = rss_bytes(server.proc.pid) + rss_bytes(worker)
        seen = asyncio.run(run_load(server.base_url, DURATION_S))
        after = rss_bytes(server.proc.pid) + rss_bytes(worker)
        status = settled_status(server)
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    finally:
        stop_server(server)
    assert set(seen) <= {200, 503, "left"}, seen
    assert seen[200] > NUM_CLIENTS and seen["left"] > 0, seen
    assert seen[503] > 0, seen  # 64 clients > 8 running + 24 queued: the bound was reached
    assert status["num_running"] == 0 and status["num_waiting"] == 0
    assert status["pid"] == worker and status["num_restarts"] == 0
    assert 'pensieve_requests_in_flight{model="' + MODEL + '"} 0.0' in metrics
    assert after - before < 64 << 20, (before, after)  # no steady growth
