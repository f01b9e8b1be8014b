"""Cluster mode end to end: two Ray nodes on this machine (each its own `ray start`), `pensieve
serve --cluster` deploying two engine replicas of the real default model, driven by the official
`openai` client.

    conversations stick to their replica (the router's HRW owner), follow-ups hit its memory
    a client hanging up cancels the request in the replica
    SIGKILL a replica mid-stream: the stream ends with an error event, never hangs; the next
    turns of its conversations run on a live replica, their history restored from the shared
    memory tier (a real redis-server), the answer as a recompute's within the suite's tolerance;
    Serve replaces it
    Redis stopped: requests still succeed (recomputed), the errors counted
    stopping the server deletes its Serve application; stopping the cluster leaves no process
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from pensieve.cluster.routing import hrw_order
from tests.support.ray_cluster import (
    RayCluster,
    cluster_env,
    is_alive,
    start_ray_cluster,
    stop_ray_cluster,
)
from tests.support.redis_server import RedisServer, start_redis, stop_redis
from tests.support.server import (
    MODEL,
    Server,
    assert_same_greedy_run,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.e2e

NUM_CONVERSATIONS = 8
NUM_TURNS = 3
LONG = 3000  # tokens: an answer still streaming well after the test acts on it


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own redis-server: a test stops it."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture(scope="module")
def shared_tier_args(redis: RedisServer) -> list[str]:
    return ["--memory-shared", redis.url()]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = start_ray_cluster(num_nodes=2, cpus_per_node=1)
    yield cluster
    stop_ray_cluster(cluster)  # again, in case a test failed before it stopped it


@pytest.fixture(scope="module")
def server(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory,
           shared_tier_args: list[str]) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as env:
        for key, value in cluster_env().items():  # the server joins with this checkout
            env.setenv(key, value)
        srv = start_server(tmp_path_factory.mktemp("cluster"), "--cluster",
                           ray_cluster.address, "--replicas", "2", "--threads", "1",
                           "--parallel", "8", "--ctx-size", "4096", *shared_tier_args)
    yield srv
    if srv.proc.poll() is None:
        stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                  timeout=120)


def replicas(server: Server) -> list[dict[str, Any]]:
    return [r for r in server.model_status()["replicas"] if r["state"] == "ready"]


def ask(client: OpenAI, session: str, history: list[dict[str, str]], question: str
        ) -> tuple[str, str, int]:
    """One turn: (the replica that answered, the answer, cached prompt tokens). Half the
    conversations name themselves with the header, half with OpenAI's `user` field."""
    history.append({"role": "user", "content": question})
    by_header = int(session.rsplit("-", 1)[1]) % 2 == 0
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=history, max_tokens=12, temperature=0,  # type: ignore[arg-type]
        extra_headers={"X-Session-Id": session} if by_header else None,
        user=openai.NOT_GIVEN if by_header else session)
    completion = raw.parse()
    answer = completion.choices[0].message.content or ""
    history.append({"role": "assistant", "content": answer})
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    Conversations.prompt_tokens[session] = usage.prompt_tokens
    return raw.headers["x-pensieve-replica"], answer, usage.prompt_tokens_details.cached_tokens or 0


def sessions_owned(live: list[str]) -> dict[str, list[str]]:
    """NUM_CONVERSATIONS session ids, half owned by each replica (by the router's HRW)."""
    owned: dict[str, list[str]] = {r: [] for r in live}
    i = 0
    while min(len(v) for v in owned.values()) < NUM_CONVERSATIONS // len(live):
        session = f"conv-{i}"
        owner = hrw_order(session, live)[0]
        if len(owned[owner]) < NUM_CONVERSATIONS // len(live):
            owned[owner].append(session)
        i += 1
    return owned


class Conversations:
    """State shared by the tests of this module, in order."""

    owned: dict[str, list[str]] = {}
    histories: dict[str, list[dict[str, str]]] = {}
    prompt_tokens: dict[str, int] = {}  # of each session's last turn
    killed: dict[str, Any] = {}


def test_health_shows_each_replica(server: Server) -> None:
    live = replicas(server)
    assert len(live) == 2
    assert len({r["node_id"] for r in live}) == 2  # one replica per node
    for r in live:
        assert r["pid"] > 0 and r["worker_pid"] > 0 and r["pid"] != r["worker_pid"]
        assert {"num_in_flight", "num_running", "memory"} <= r.keys()


def test_follow_ups_land_on_their_conversations_replica(server: Server,
                                                         client: OpenAI) -> None:
    live = sorted(r["replica"] for r in replicas(server))
    Conversations.owned = sessions_owned(live)
    for owner, sessions in Conversations.owned.items():
        for session in sessions:
            history = Conversations.histories.setdefault(session, [])
            for turn in range(NUM_TURNS):
                replica, answer, cached = ask(client, session, history,
                                              f"Turn {turn}: name a color ({session}).")
                assert replica == owner, (session, turn)
                assert answer
                if turn > 0:
                    assert cached > 0, (session, turn)  # its history was in memory there


def test_a_client_hanging_up_cancels_the_request_in_the_replica(server: Server) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": LONG, "ignore_eos": True,
            "temperature": 0, "messages": [{"role": "user", "content": "Count to 1000."}]}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                        headers={"X-Session-Id": "hang-up"}) as r:
        replica = r.headers["x-pensieve-replica"]
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # the connection is closed: the replica stops working on it (long before LONG tokens)
    wait_for(lambda: _in_flight(server, replica) == 0, timeout=15)


def test_a_replica_killed_mid_stream_fails_cleanly_and_its_conversations_move(
        server: Server, client: OpenAI) -> None:
    victim_id, sessions = next(iter(Conversations.owned.items()))
    victim = next(r for r in replicas(server) if r["replica"] == victim_id)
    Conversations.killed = victim
    history = Conversations.histories[sessions[0]]
    by_header = {"X-Session-Id": sessions[0]}
    stream = client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=LONG, temperature=0, extra_headers=by_header,
        messages=[*history, {"role": "user", "content": "Now count from one to a thousand."}],
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    os.kill(victim["pid"], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError) as failed:
        for _ in chunks:
            pass
    assert time.monotonic() - started < 60  # ended by an error event, not a timeout
    assert "replica" in str(failed.value.message).lower()
    for session in sessions:  # their next turn runs on a live replica
        before = Conversations.prompt_tokens[session]
        replica, answer, cached = ask(client, session, Conversations.histories[session],
                                      "One more color, please.")
        assert replica != victim_id and answer
        # the history came back from the shared tier: at least every whole 64-token block of
        # the last turn's prompt (a partial last block is found when the new prompt repeats it
        # token for token, which depends on how the answer's text tokenizes again)
        assert before >= 64 and cached >= before - before % 64


def test_a_moved_conversation_answers_as_a_recompute_would(client: OpenAI) -> None:
    victim_id, sessions = next(iter(Conversations.owned.items()))
    session = sessions[0]
    messages = [*Conversations.histories[session], {"role": "user", "content": "And a fruit?"}]
    runs = []
    for reuse in (True, False):  # restored from memory, then computed from scratch
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0,  # type: ignore[arg-type]
            logprobs=True, top_logprobs=5, extra_headers={"X-Session-Id": session},
            extra_body={"cache_prompt": reuse})
        completion = raw.parse()
        assert raw.headers["x-pensieve-replica"] != victim_id
        usage = completion.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        runs.append((usage.prompt_tokens_details.cached_tokens or 0,
                     completion.choices[0].logprobs))
    (cached, restored), (fresh_cached, fresh) = runs
    assert cached > 0 and fresh_cached == 0
    assert restored is not None and fresh is not None
    assert_same_greedy_run(restored.content, fresh.content)


def test_serve_replaces_the_dead_replica(server: Server) -> None:
    victim = Conversations.killed
    assert victim, "runs after the kill"

    def replaced() -> bool:
        live = replicas(server)
        return len(live) == 2 and victim["replica"] not in {r["replica"] for r in live}

    wait_for(replaced, timeout=180)
    assert not is_alive(victim["worker_pid"])  # the dead replica's model worker went too


def test_with_redis_stopped_requests_still_succeed(server: Server, client: OpenAI,
                                                   redis: RedisServer) -> None:
    stop_redis(redis)
    history: list[dict[str, str]] = []
    for turn in range(2):  # nothing fails: the shared tier is a miss, the turn recomputes
        replica, answer, _ = ask(client, "after-redis-0", history, f"Turn {turn}: a number?")
        assert replica and answer
    wait_for(lambda: sum(int((r["memory"] or {}).get("shared_errors", 0))
                         for r in replicas(server)) > 0, timeout=30)


def test_stopping_deletes_the_app_and_the_cluster_leaves_no_process(
        server: Server, ray_cluster: RayCluster) -> None:
    pids = [p for r in replicas(server) for p in (r["pid"], r["worker_pid"])]
    assert pids
    stop_server(server)
    assert server.proc.returncode == 0
    wait_for(lambda: not any(is_alive(p) for p in pids), timeout=60)  # app deleted
    assert stop_ray_cluster(ray_cluster) == set()
    assert ray_cluster.processes() == set()


def _in_flight(server: Server, replica: str) -> int | None:
    for r in replicas(server):
        if r["replica"] == replica:
            return int(r["num_in_flight"])
    return None

