"""Conversation-affine routing (pensieve/cluster/routing.py) on fake replicas."""

from __future__ import annotations

import subprocess
import sys

from pensieve.cluster.routing import (
    AffinityPolicy,
    PrefixMemory,
    ReplicaLoad,
    RoutingHints,
    block_hashes,
    hrw_order,
)

REPLICAS = [ReplicaLoad("r1", 0), ReplicaLoad("r2", 0), ReplicaLoad("r3", 0)]


def owner(session: str, replicas: list[ReplicaLoad], policy: AffinityPolicy | None = None
          ) -> str:
    return (policy or AffinityPolicy()).order(RoutingHints(session_id=session), replicas)[0]


def test_session_owner_first_and_every_ingress_agrees() -> None:
    owners = {s: owner(s, REPLICAS) for s in (f"conv-{i}" for i in range(60))}
    assert set(owners.values()) == {"r1", "r2", "r3"}  # sessions spread over the replicas
    # another router (another ingress), replicas listed in another order: the same owners
    other = AffinityPolicy()
    assert all(owner(s, REPLICAS[::-1], other) == o for s, o in owners.items())
    # whatever the load of the others
    loaded = [ReplicaLoad(r.replica_id, 7) for r in REPLICAS]
    assert all(owner(s, loaded) == o for s, o in owners.items())


def test_overloaded_owner_falls_back_to_the_sessions_next_choice() -> None:
    policy = AffinityPolicy(max_queue=4)
    ranked = hrw_order("conv-7", ["r1", "r2", "r3"])
    replicas = [ReplicaLoad(r.replica_id, 5 if r.replica_id == ranked[0] else 1)
                for r in REPLICAS]
    order = policy.order(RoutingHints(session_id="conv-7"), replicas)
    assert order == [ranked[1], ranked[2], ranked[0]]  # the owner only as the last resort
    at_bound = [ReplicaLoad(r.replica_id, 4) for r in REPLICAS]
    assert policy.order(RoutingHints(session_id="conv-7"), at_bound)[0] == ranked[0]


def test_dead_owner_falls_back_and_its_sessions_only_move() -> None:
    sessions = [f"conv-{i}" for i in range(300)]
    before = {s: owner(s, REPLICAS) for s in sessions}
    survivors = [r for r in REPLICAS if r.replica_id != "r2"]
    after = {s: owner(s, survivors) for s in sessions}
    for s in sessions:
        if before[s] == "r2":
            assert after[s] == hrw_order(s, ["r1", "r2", "r3"])[1]
        else:
            assert after[s] == before[s]


def test_adding_a_replica_remaps_about_one_in_n_sessions() -> None:
    sessions = [f"session-{i}" for i in range(10_000)]
    four = [ReplicaLoad(f"replica-{i}") for i in range(4)]
    five = [*four, ReplicaLoad("replica-new")]
    policy = AffinityPolicy()
    before = {s: policy.order(RoutingHints(session_id=s), four)[0] for s in sessions}
    after = {s: policy.order(RoutingHints(session_id=s), five)[0] for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(after[s] == "replica-new" for s in moved)  # nothing moves between old ones
    assert 0.16 < len(moved) / len(sessions) < 0.24  # about 1/5


def test_without_a_session_the_longest_prefix_wins_over_load() -> None:
    policy = AffinityPolicy(max_queue=8)
    history = "system: be brief.\n" + "user: tell me about tides. " * 40
    turn1 = RoutingHints(prefix_hashes=block_hashes(history))
    assert len(turn1.prefix_hashes) >= 3
    policy.routed(turn1, "r3")
    policy.routed(RoutingHints(prefix_hashes=block_hashes(history[:300])), "r2")
    loads = [ReplicaLoad("r1", 0), ReplicaLoad("r2", 1), ReplicaLoad("r3", 3)]
    turn2 = RoutingHints(prefix_hashes=block_hashes(history + "assistant: ... " * 30))
    assert policy.order(turn2, loads) == ["r3", "r2", "r1"]  # longest, shorter, none
    # an unrelated prompt goes to the least loaded
    other = RoutingHints(prefix_hashes=block_hashes("x" * 2000))
    assert policy.order(other, loads)[0] == "r1"
    # the prefix holder, once overloaded, goes last
    busy = [ReplicaLoad("r1", 0), ReplicaLoad("r2", 1), ReplicaLoad("r3", 9)]
    assert policy.order(turn2, busy) == ["r2", "r1", "r3"]


def test_a_replica_gone_is_forgotten() -> None:
    policy = AffinityPolicy()
    hints = RoutingHints(prefix_hashes=block_hashes("y" * 1024))
    policy.routed(hints, "r2")
    policy.keep_only(["r1", "r3"])
    assert policy.prefixes.num_blocks("r2", hints.prefix_hashes) == 0
    assert policy.order(hints, REPLICAS[:1]) == ["r1"]


def test_pinned_requests_reach_their_replica() -> None:
    policy = AffinityPolicy()
    assert policy.order(RoutingHints(session_id="s", replica="r3"), REPLICAS) == ["r3"]
    assert policy.order(RoutingHints(replica="gone"), []) == []


def test_block_hashes_are_chained_and_stable_across_processes() -> None:
    text = "abc" * 300
    hashes = block_hashes(text, block_chars=128)
    assert len(hashes) == len(text.encode()) // 128
    assert block_hashes(text + "different tail" * 20, block_chars=128)[:len(hashes)] == hashes
    changed = block_hashes("X" + text[1:], block_chars=128)
    assert not set(changed) & set(hashes)  # a change in block 0 changes every hash after it
    code = ("from pensieve.cluster.routing import block_hashes; "
            f"print(','.join(block_hashes({text!r}, block_chars=128)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123", "PYTHONPATH":
                                            ":".join(sys.path)})
    assert other.stdout.strip().split(",") == list(hashes)
    tokens = list(range(200))
    assert block_hashes(tokens, block_tokens=64) == block_hashes(tokens[:192] + [7],
                                                                 block_tokens=64)


def test_prefix_memory_is_bounded() -> None:
    memory = PrefixMemory(max_hashes=10)
    memory.remember("r1", [f"h{i}" for i in range(25)])
    assert memory.num_blocks("r1", ["h0", "h1"]) == 0  # the oldest were dropped
    assert memory.num_blocks("r1", [f"h{i}" for i in range(25)]) == 25
    assert memory.num_blocks("r1", ["h15", "h16", "nope"]) == 2
