"""Cluster mode against the embedded server on the same machine: TTFT and inter-token latency
through Ray Serve vs a local worker, and the conversation router's hit rate.

Both setups serve the default model with the same per-engine settings (`--threads`,
`--parallel`, `--ctx-size`); the cluster is two Ray nodes on this machine (each its own `ray
start` on loopback, one CPU each) with two replicas, Pensieve the ingress. The workload is the
same for both: N conversations of T turns, one request at a time (latency, not throughput),
each turn streamed; `--rounds` repeats it on fresh servers and medians are reported.

    ttft        time to the first content chunk, follow-up turns only (memory in play)
    itl         mean gap between content chunks of an answer
    hit rate    follow-up turns answered by the replica of the conversation's previous turn,
                and follow-up turns with cached prompt tokens

    python bench/cluster.py                    # 8 conversations x 3 turns, 3 rounds
    python bench/cluster.py --rounds 1 --conversations 4

Only loopback addresses are used; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.support.ray_cluster import (  # noqa: E402
    cluster_env,
    start_ray_cluster,
    stop_ray_cluster,
)
from tests.support.server import MODEL, Server, start_server, stop_server  # noqa: E402

ENGINE_FLAGS = ["--threads", "1", "--parallel", "4", "--ctx-size", "4096"]


@dataclass
class Turn:
    ttft_s: float
    gaps_s: list[float]
    cached: int
    replica: str | None


@dataclass
class RunResult:
    turns: dict[str, list[Turn]] = field(default_factory=dict)

    def follow_ups(self) -> list[Turn]:
        return [t for turns in self.turns.values() for t in turns[1:]]

    def ttft_ms(self) -> float:
        return statistics.median(t.ttft_s for t in self.follow_ups()) * 1000

    def itl_ms(self) -> float:
        gaps = [g for turns in self.turns.values() for t in turns for g in t.gaps_s]
        return statistics.mean(gaps) * 1000 if gaps else float("nan")

    def same_replica_rate(self) -> float | None:
        pairs = [(a.replica, b.replica) for turns in self.turns.values()
                 for a, b in zip(turns, turns[1:], strict=False)]
        if not pairs or pairs[0][0] is None:
            return None
        return sum(a == b for a, b in pairs) / len(pairs)

    def cached_rate(self) -> float:
        follow = self.follow_ups()
        return sum(t.cached > 0 for t in follow) / len(follow)


def stream_turn(http: httpx.Client, base: str, session: str,
                history: list[dict[str, str]]) -> tuple[Turn, str]:
    body = {"model": MODEL, "messages": history, "max_tokens": 48, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    stamps: list[float] = []
    text, cached = "", 0
    with http.stream("POST", f"{base}/v1/chat/completions", json=body,
                     headers={"X-Session-Id": session}) as r:
        r.raise_for_status()
        replica = r.headers.get("x-pensieve-replica")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    text += choice["delta"]["content"]
    ttft = (stamps[0] if stamps else time.perf_counter()) - started
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return Turn(ttft, gaps, cached, replica), text


def run_workload(server: Server, conversations: int, turns: int) -> RunResult:
    result = RunResult()
    with httpx.Client(timeout=300) as http:
        for c in range(conversations):
            session = f"bench-{c}"
            history = [{"role": "system", "content": f"You are assistant number {c}. "
                        "Answer in one short sentence."}]
            for t in range(turns):
                history.append({"role": "user", "content": f"Question {t}: name a city "
                                f"and a river near it (conversation {c})."})
                turn, text = stream_turn(http, server.base_url, session, history)
                history.append({"role": "assistant", "content": text})
                result.turns.setdefault(session, []).append(turn)
    return result


def embedded_round(args: argparse.Namespace) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        server = start_server(Path(tmp), *ENGINE_FLAGS)
        try:
            return run_workload(server, args.conversations, args.turns)
        finally:
            stop_server(server)


def cluster_round(args: argparse.Namespace) -> RunResult:
    cluster = start_ray_cluster(num_nodes=2, cpus_per_node=1)
    saved = dict(os.environ)
    os.environ.update(cluster_env())
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            server = start_server(Path(tmp), "--cluster", cluster.address, "--replicas", "2",
                                  *ENGINE_FLAGS)
            try:
                return run_workload(server, args.conversations, args.turns)
            finally:
                stop_server(server)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        left = stop_ray_cluster(cluster)
        if left:
            print(f"warning: Ray processes still alive: {sorted(left)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args(argv)
    rows: dict[str, list[RunResult]] = {"embedded": [], "ray (2 replicas)": []}
    for i in range(args.rounds):  # alternate the order so drift hurts both alike
        order = [("embedded", embedded_round), ("ray (2 replicas)", cluster_round)]
        for name, run in order if i % 2 == 0 else order[::-1]:
            rows[name].append(run(args))
            print(f"round {i + 1} {name}: done", file=sys.stderr)
    print(f"\n{args.conversations} conversations x {args.turns} turns, one request at a time, "
          f"{args.rounds} rounds (medians over rounds); engine flags {' '.join(ENGINE_FLAGS)}")
    print(f"{'setup':<18} {'TTFT follow-up ms':>18} {'ITL ms':>8} {'cached turns':>13} "
          f"{'same replica':>13}")
    for name, results in rows.items():
        same = [r.same_replica_rate() for r in results]
        same_text = "-" if same[0] is None else \
            f"{statistics.median(s for s in same if s is not None):.0%}"
        print(f"{name:<18} {statistics.median(r.ttft_ms() for r in results):>18.1f} "
              f"{statistics.median(r.itl_ms() for r in results):>8.2f} "
              f"{statistics.median(r.cached_rate() for r in results):>13.0%} {same_text:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
