"""A conversation's history restored from the shared memory tier (Redis) against recomputed.

Two Pensieve servers, each with its own data dir, share one redis-server (started here on a
free loopback port, no persistence). For each of N conversations (default 3) whose first turn is
about 1,500 tokens, server A answers the first turn, and its KV blocks are written behind to
Redis. Server B, which has never seen the conversation, then answers the follow-up (max_tokens
1, non-streamed: the time to its first token) three ways, one after another:

- shared: the first time, its history restored from Redis (read ahead, verified, assembled);
- local: the same request again, now served from B's own memory (the live tier);
- recompute: the same request with `cache_prompt: false` (memory off for it).

Prints each run and the medians, with the cached_tokens every reply reported.

    PENSIEVE_BENCH_PENSIEVE=/path/to/.venv/bin/pensieve python bench/shared_tier.py --threads 1
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from servers import SERVERS, ServerProcess, free_port
from serving import DEFAULT_MODEL, LOG_DIR

log = logging.getLogger("bench.shared_tier")

COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange")
WAYS = ("shared", "local", "recompute")


def first_turn(seed: int) -> list[dict[str, str]]:
    notes = " ".join(f"Note {i}: the {COLORS[(i + seed) % 7]} box on shelf "
                     f"{(i * 7 + seed) % 13} holds {(i * 11 + seed) % 17} marbles."
                     for i in range(92))
    return [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": f"{notes}\nWhich shelf holds the red boxes?"}]


def chat(base_url: str, messages: list[dict[str, str]], max_tokens: int,
         **extra: object) -> tuple[float, dict]:
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, **extra}
    started = time.perf_counter()
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed, r.json()


def wait_written(base_url: str, timeout_s: float = 60.0) -> None:
    """Until the server's write-behind queue is empty (its /admin/memory saves the context)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = httpx.get(f"{base_url}/admin/memory", timeout=60).json()["stats"] or {}
        if stats.get("shared_blocks_written", 0) > 0 and stats.get("shared_write_queue") == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the write-behind queue did not drain")


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise RuntimeError("redis-server did not start")
    return proc


def pensieve(port: int, data_dir: Path, threads: int, redis_url: str) -> ServerProcess:
    argv = SERVERS["pensieve"].argv(model=DEFAULT_MODEL, port=port, threads=threads,
                                    parallel=16)
    argv += ["--data-dir", str(data_dir), "--model-alias", "bench", "--memory-shared",
             redis_url]
    return ServerProcess(argv, LOG_DIR / f"shared-tier-{port}.log", port, "/health")


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="pensieve-shared-") as tmp:
        workdir = Path(tmp)
        redis_port = free_port()
        redis = start_redis(redis_port, workdir)
        url = f"redis://127.0.0.1:{redis_port}/0"
        try:
            with pensieve(free_port(), workdir / "a", args.threads, url) as a, \
                    pensieve(free_port(), workdir / "b", args.threads, url) as b:
                a.wait_ready(300)
                b.wait_ready(300)
                for seed in range(args.conversations):
                    measure_one(a.base_url, b.base_url, seed, times)
        finally:
            redis.terminate()
            redis.wait(10)
    return times


def measure_one(a: str, b: str, seed: int, times: dict[str, list[float]]) -> None:
    history = first_turn(seed)
    _, first = chat(a, history, 16)
    wait_written(a)
    follow_up = [*history, {"role": "assistant",
                            "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And how many marbles does note 3 mention?"}]
    for way in WAYS:
        extra = {"cache_prompt": False} if way == "recompute" else {}
        elapsed, reply = chat(b, follow_up, 1, **extra)
        usage = reply["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        print(f"conversation {seed}: {way:9s} {elapsed * 1000:7.0f} ms  prompt "
              f"{usage['prompt_tokens']} tokens, cached {cached} (history "
              f"{first['usage']['prompt_tokens']})", flush=True)
        times[way].append(elapsed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conversations", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    times = run(args)
    for way in WAYS:
        print(f"median {way:9s} {statistics.median(times[way]) * 1000:7.0f} ms "
              f"(n={len(times[way])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
