"""The shared memory tier end to end: two `pensieve serve` processes (their own data dirs, one
redis-server), the real default model, the official `openai` client. A conversation held by
one server continues on the other, restored from Redis; with Redis stopped, requests still
succeed (computed instead)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support.redis_server import RedisServer, start_redis, stop_redis
from tests.support.server import (
    MODEL,
    Server,
    assert_same_greedy_run,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

SYSTEM = "You are a concise assistant. Answer in one short sentence."
COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange")


def notes(num: int, seed: int = 0) -> str:
    """A long, varied first message (about 15 tokens a note)."""
    return " ".join(f"Note {i}: the {COLORS[(i + seed) % 7]} box on shelf {(i * 7 + seed) % 13} "
                    f"holds {(i * 11 + seed) % 17} marbles." for i in range(num))


def first_turn(seed: int = 0) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": notes(92, seed) + "\nWhich shelf holds the red boxes?"}]


def follow_up(history: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return [*history, {"role": "assistant", "content": answer},
            {"role": "user", "content": "And how many marbles does note 3 mention?"}]


def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                  timeout=300)


def memory_stats(server: Server) -> dict:
    """The memory counters, after the server gave its context's KV to its tiers."""
    r = httpx.get(f"{server.base_url}/admin/memory", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["stats"] or {}


def written_behind(server: Server) -> bool:
    stats = memory_stats(server)
    return stats.get("shared_blocks_written", 0) > 0 and stats.get("shared_write_queue") == 0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Its own redis-server: the test stops it."""
    server = start_redis(tmp_path)
    yield server
    stop_redis(server)


@pytest.fixture
def servers(redis: RedisServer, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    flags = ("--threads", "1", "--parallel", "2", "--ctx-size", "4096",
             "--memory-shared", redis.url())
    one = start_server(tmp_path, *flags, data_dir=tmp_path / "one")
    try:
        two = start_server(tmp_path, *flags, data_dir=tmp_path / "two")
    except BaseException:
        stop_server(one)
        raise
    yield one, two
    stop_server(two)
    stop_server(one)


def test_a_conversation_continues_on_another_server_from_the_shared_tier(
        servers: tuple[Server, Server], redis: RedisServer) -> None:
    one, two = servers
    history = first_turn()
    first = client(one).chat.completions.create(model=MODEL, messages=history, max_tokens=16,
                                                temperature=0)
    assert first.usage is not None
    history_tokens = first.usage.prompt_tokens
    assert 1400 <= history_tokens <= 1700
    wait_for(lambda: written_behind(one), timeout=60)

    messages = follow_up(history, first.choices[0].message.content or "")
    restored = client(two).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True,
        top_logprobs=5)
    assert restored.usage is not None and restored.usage.prompt_tokens_details is not None
    cached = restored.usage.prompt_tokens_details.cached_tokens or 0
    assert history_tokens <= cached < restored.usage.prompt_tokens  # the history, from Redis
    stats = memory_stats(two)
    assert stats["shared_hits"] >= 1 and stats["shared_blocks_read"] >= history_tokens // 64
    assert stats["shared_bad_blobs"] == 0 and stats["shared_errors"] == 0

    recomputed = client(two).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True,
        top_logprobs=5, extra_body={"cache_prompt": False})
    assert recomputed.usage is not None and recomputed.usage.prompt_tokens_details is not None
    assert recomputed.usage.prompt_tokens_details.cached_tokens == 0
    assert restored.choices[0].logprobs is not None and recomputed.choices[0].logprobs is not None
    assert_same_greedy_run(restored.choices[0].logprobs.content or [],
                           recomputed.choices[0].logprobs.content or [])
    metrics = httpx.get(f"{two.base_url}/metrics", timeout=30).text
    assert f'pensieve_memory_shared_hits_total{{model="{MODEL}"}}' in metrics

    stop_redis(redis)  # the store goes away: requests compute instead, none fails
    other = first_turn(seed=3)
    reply = client(one).chat.completions.create(model=MODEL, messages=other, max_tokens=8,
                                                temperature=0)
    again = client(two).chat.completions.create(
        model=MODEL, messages=follow_up(other, reply.choices[0].message.content or ""),
        max_tokens=8, temperature=0)
    assert again.choices[0].message.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) < 64  # nothing restored
    assert memory_stats(two)["shared_errors"] >= 1
