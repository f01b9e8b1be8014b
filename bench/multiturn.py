"""Memory benchmarks: multi-turn conversations, and conversations resumed after a restart.

Two workloads, each run against llama-server (prompt cache on, its defaults), Pensieve with
its memory on (the defaults) and Pensieve with `--no-prefix-cache`, one server after another:

- multiturn: N conversations of T turns sharing one ~300-word system prompt; C clients each
  take the next due conversation, and a conversation thinks 1-3 s between its turns while
  others proceed. Every turn resends the whole history. Measures TTFT per turn and how many
  prompt tokens the server served from its cache.
- restart: K conversations of 3 turns; the server is stopped (SIGTERM) and started again on
  the same data dir, then every conversation's 4th turn is sent, one at a time. Compared with
  the same 4th-turn prompts on a fresh server with memory off.
- sequential: conversations taken one at a time, as a new user tries a server (no queueing,
  no think time): 1 conversation x 5 turns, then 12 conversations x 3 turns, on a fresh server
  each. Measures follow-up TTFT; `--rounds` runs every server once per round, in alternating
  order, and reports medians over rounds.

Pensieve runs in several memory configurations: `pensieve` (the defaults: KV blocks),
`pensieve-snapshots` (`--memory-block-tokens 0`: whole snapshots, the earlier design),
`pensieve-live-only` (`--memory-ram-mb 0 --memory-disk-mb 0`) and `pensieve-nomem`.

    python bench/multiturn.py                       # both workloads, default sizes
    python bench/multiturn.py --workloads multiturn --conversations 6 --turns 3 --think 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import json
import logging
import random
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from loadgen import (
    MAX_ERROR_CHARS,
    Timeouts,
    check_loopback,
    discover_model,
    make_client,
    percentile,
)
from report import Table, print_table, render_markdown
from servers import SERVERS, ServerNotReady, ServerProcess, ServerSpec, free_port
from serving import DEFAULT_MODEL, LOG_DIR, busy_cpu_fraction, git_revision
from workload import SamplingConfig, build_chat_body

log = logging.getLogger("bench.multiturn")

SYSTEM_PROMPT = (
    "You are Atlas, the support assistant of Northwind Outfitters, an online shop that sells "
    "hiking, camping and climbing gear to customers in Europe and North America. You answer "
    "questions about products, orders, deliveries, returns, warranties and the care of "
    "outdoor equipment. Be friendly, precise and brief: answer in at most three short "
    "paragraphs or a short list, and put the most useful fact first. When a customer asks "
    "about an order, never invent an order number, a tracking code or a delivery date; ask "
    "for the order number and explain where to find it (in the confirmation e-mail and under "
    "My Account, Orders). Standard delivery takes three to five working days, express "
    "delivery one to two working days; orders placed before two in the afternoon leave the "
    "warehouse the same day. Returns are free within sixty days for unused items in their "
    "original packaging; worn footwear can be returned within thirty days if it shows no "
    "damage. Refunds reach the original payment method within ten working days after the "
    "return arrives. Tents, backpacks and sleeping bags carry a five-year warranty against "
    "manufacturing defects, other items two years; normal wear, misuse and accidents are not "
    "covered, but the repair service can often help at a fair price. When a customer "
    "describes a safety problem, such as a damaged harness, rope or carabiner, tell them to "
    "stop using the item at once and to contact the safety team. Give care advice that "
    "follows the manufacturer's instructions: wash technical jackets at thirty degrees "
    "without fabric softener, dry down products on low heat with clean tennis balls, and "
    "store sleeping bags loosely, never compressed. If you do not know an answer, say so and "
    "offer to pass the question to a human colleague, who replies within one working day. "
    "Do not discuss competitors' prices, do not give medical advice, and keep the customer's "
    "personal data private. Always end with one short sentence asking whether anything else "
    "is needed."
)

QUESTIONS: tuple[str, ...] = (
    "How long does express delivery take?",
    "Can I return boots I wore once on a short walk?",
    "My tent pole snapped on the first night. Is that covered?",
    "How should I wash my rain jacket?",
    "Where do I find my order number?",
    "Do you ship to Canada?",
    "How do I store a down sleeping bag over the summer?",
    "The buckle on my backpack cracked. What can I do?",
    "When will my refund arrive?",
    "Is a sixty-litre pack too big for a weekend trip?",
    "Can I change the delivery address after ordering?",
    "What does the warranty not cover?",
    "My climbing rope has a soft spot. Should I keep using it?",
    "Which sleeping bag is warm enough for zero degrees?",
    "Can I exchange a jacket for a different size?",
    "How do I reproof a waterproof jacket?",
    "Do you repair zips on tents?",
    "I ordered at noon. When does it leave the warehouse?",
    "What payment methods do you accept?",
    "Can you recommend a stove for winter camping?",
    "How do I clean a camping stove?",
    "Is there a discount for club members?",
    "My parcel says delivered but it is not here. What now?",
    "How heavy is your lightest two-person tent?",
    "Can I return an item bought in a sale?",
    "What size of trekking poles should I choose?",
    "How do I dry hiking boots after a wet day?",
    "Can I speak to a human, please?",
    "Thanks. And how do I care for merino base layers?",
    "Could you summarise what you told me so far?",
)

SERVER_CONFIGS = ("llama-server", "pensieve", "pensieve-snapshots", "pensieve-live-only",
                  "pensieve-nomem")
DEFAULT_SERVERS = ("llama-server", "pensieve", "pensieve-nomem")
WORKLOADS = ("multiturn", "restart", "sequential")
DEFAULT_WORKLOADS = ("multiturn", "restart")
SEQUENTIAL_SHAPES = ((1, 5), (12, 3))  # (conversations, turns), each conversation in one go
RESTART_TURNS = 3  # turns before the restart; the next one is measured
RATIO_TARGETS = {"multiturn": 0.7, "restart": 0.25}


# ------------------------------------------------------------------------- servers


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """One column of the comparison: a server kind and how memory is set on it."""

    name: str
    spec: ServerSpec
    extra_flags: tuple[str, ...] = ()
    uses_data_dir: bool = False
    cold_flags: tuple[str, ...] = ()  # for the cold baseline's fresh server
    cold_body: dict[str, Any] = dataclasses.field(default_factory=dict)  # ... and its requests


def server_configs() -> dict[str, ServerConfig]:
    return {
        "llama-server": ServerConfig(
            "llama-server", SERVERS["llama-server"], cold_body={"cache_prompt": False}
        ),
        "pensieve": ServerConfig(
            "pensieve",
            SERVERS["pensieve"],
            uses_data_dir=True,
            cold_flags=("--no-prefix-cache",),
        ),
        "pensieve-snapshots": ServerConfig(
            "pensieve-snapshots",
            SERVERS["pensieve"],
            extra_flags=("--memory-block-tokens", "0"),
            uses_data_dir=True,
            cold_flags=("--no-prefix-cache",),
        ),
        "pensieve-live-only": ServerConfig(
            "pensieve-live-only",
            SERVERS["pensieve"],
            extra_flags=("--memory-ram-mb", "0", "--memory-disk-mb", "0"),
            uses_data_dir=True,
            cold_flags=("--no-prefix-cache",),
        ),
        "pensieve-nomem": ServerConfig(
            "pensieve-nomem",
            SERVERS["pensieve"],
            extra_flags=("--no-prefix-cache",),
            uses_data_dir=True,
            cold_flags=("--no-prefix-cache",),
        ),
    }


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    servers: list[str]
    workloads: list[str]
    model: Path
    threads: int
    llama_server_parallel: int
    conversations: int
    turns: int
    concurrency: int
    think_s: tuple[float, float]
    restart_conversations: int
    sampling: SamplingConfig
    seed: int
    timeouts: Timeouts
    ready_timeout_s: float
    stop_grace_s: float
    rounds: int = 1
    sequential_sampling: SamplingConfig = SamplingConfig(max_tokens=80)
    sequential_shapes: tuple[tuple[int, int], ...] = SEQUENTIAL_SHAPES


class Server:
    """A started server of one config; `restart` stops it (SIGTERM, waits) and starts it again."""

    def __init__(
        self, config: ServerConfig, plan: Plan, data_dir: Path | None, *, cold: bool, tag: str
    ) -> None:
        self.config = config
        self.plan = plan
        self.port = free_port()
        argv = config.spec.argv(
            model=plan.model, port=self.port, threads=plan.threads,
            parallel=plan.llama_server_parallel,
        )  # fmt: skip
        argv += list(config.cold_flags if cold else config.extra_flags)
        if data_dir is not None:
            argv += ["--data-dir", str(data_dir)]
        self.argv = argv
        self.tag = tag
        self.starts = 0
        self.startup_s: list[float] = []
        self.process: ServerProcess | None = None

    @property
    def base_url(self) -> str:
        return check_loopback(f"http://127.0.0.1:{self.port}")

    def start(self) -> None:
        self.starts += 1
        log_path = LOG_DIR / f"multiturn-{self.config.name}-{self.tag}-{self.starts}.log"
        self.process = ServerProcess(self.argv, log_path, self.port, self.config.spec.ready_path)
        self.process.start()
        try:
            self.startup_s.append(self.process.wait_ready(self.plan.ready_timeout_s))
        except ServerNotReady:
            self.stop()
            raise
        log.info("%s ready after %.1f s", self.config.name, self.startup_s[-1])

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace_s=self.plan.stop_grace_s)
            self.process = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------- requests


@dataclasses.dataclass(slots=True)
class TurnResult:
    """One streamed turn. Times in seconds from sending the request."""

    conversation: int
    turn: int  # 1-based
    is_ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cached_source: str | None = None  # "usage" or "timings"
    completion_tokens: int | None = None
    content: str = ""


def _fold_chunk(result: TurnResult, chunk: dict[str, Any], start: float) -> None:
    if "error" in chunk:
        raise RuntimeError(f"server error: {json.dumps(chunk['error'])[:MAX_ERROR_CHARS]}")
    usage = chunk.get("usage")
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None:
            result.cached_tokens, result.cached_source = int(cached), "usage"
    timings = chunk.get("timings")
    if timings and result.cached_source != "usage" and "cache_n" in timings:
        result.cached_tokens, result.cached_source = int(timings["cache_n"]), "timings"
        if result.prompt_tokens is None and "prompt_n" in timings:
            result.prompt_tokens = int(timings["prompt_n"]) + int(timings["cache_n"])
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if result.ttft_s is None:
                result.ttft_s = time.perf_counter() - start
            result.content += content


async def stream_turn(
    client: httpx.AsyncClient,
    base_url: str,
    body: dict[str, Any],
    result: TurnResult,
    timeouts: Timeouts,
) -> TurnResult:
    """Send one streaming chat completion; failures land in the result, never raise."""
    start = time.perf_counter()
    try:
        async with (
            asyncio.timeout(timeouts.request_s),
            client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response,
        ):
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {response.status_code}: {text[:MAX_ERROR_CHARS]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                if payload:
                    _fold_chunk(result, json.loads(payload), start)
        result.latency_s = time.perf_counter() - start
        result.is_ok = result.ttft_s is not None
        if not result.is_ok:
            result.error = "stream carried no content"
    except (httpx.HTTPError, RuntimeError, ValueError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    return result


async def warm_up(
    client: httpx.AsyncClient, base_url: str, sampling: SamplingConfig, model: str
) -> None:
    """One short unrelated request (no shared system prompt), not measured."""
    body = build_chat_body("Say hello.", model, dataclasses.replace(sampling, max_tokens=4))
    result = await stream_turn(client, base_url, body, TurnResult(-1, 0), Timeouts())
    if not result.is_ok:
        log.warning("warm-up failed: %s", result.error)


async def server_memory(client: httpx.AsyncClient, base_url: str) -> Any:
    """Pensieve's per-model memory counters from /health (None for other servers)."""
    try:
        health = (await client.get(f"{base_url}/health")).json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(health, dict):
        return None
    models = health.get("models")
    if isinstance(models, dict):
        return {k: v.get("memory") for k, v in models.items() if isinstance(v, dict)} or None
    if isinstance(models, list):
        return [m.get("memory") for m in models if isinstance(m, dict)] or None
    return health.get("memory")


# ------------------------------------------------------------------------- conversations


@dataclasses.dataclass(slots=True)
class Conversation:
    index: int
    questions: list[str]
    thinks_s: list[float]
    messages: list[dict[str, str]]
    turns_done: int = 0


def make_conversations(
    count: int, turns: int, think_s: tuple[float, float], seed: int
) -> list[Conversation]:
    """Deterministic from the seed: each conversation's questions and think times."""
    rng = random.Random(seed)
    return [
        Conversation(
            index=i,
            questions=[rng.choice(QUESTIONS) for _ in range(turns)],
            thinks_s=[rng.uniform(*think_s) for _ in range(turns)],
            messages=[{"role": "system", "content": SYSTEM_PROMPT}],
        )
        for i in range(count)
    ]


def turn_body(
    conv: Conversation, sampling: SamplingConfig, extra: dict[str, Any]
) -> dict[str, Any]:
    """The next turn's request: the whole history plus the next user question."""
    question = conv.questions[conv.turns_done]
    body = build_chat_body(question, "default", sampling)
    body["messages"] = [*conv.messages, {"role": "user", "content": question}]
    body.update(extra)
    return body


async def _take_turn(
    client: httpx.AsyncClient,
    base_url: str,
    conv: Conversation,
    plan: Plan,
    extra: dict[str, Any],
) -> TurnResult:
    body = turn_body(conv, plan.sampling, extra)
    result = TurnResult(conv.index, conv.turns_done + 1)
    await stream_turn(client, base_url, body, result, plan.timeouts)
    conv.messages = [*body["messages"], {"role": "assistant", "content": result.content}]
    conv.turns_done += 1
    return result


async def run_conversations(
    base_url: str, conversations: list[Conversation], turns: int, plan: Plan
) -> tuple[list[TurnResult], float]:
    """`plan.concurrency` clients; each takes the conversation due soonest; think between turns.

    Returns every turn's result and the wall time. A failed turn ends its conversation.
    """
    due: list[tuple[float, int, Conversation]] = []
    start = time.perf_counter()
    for conv in conversations:
        if conv.turns_done < turns:
            heapq.heappush(due, (start, conv.index, conv))
    in_flight = 0
    results: list[TurnResult] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal in_flight
        while True:
            now = time.perf_counter()
            if due and due[0][0] <= now:
                _, _, conv = heapq.heappop(due)
                in_flight += 1
                try:
                    result = await _take_turn(client, base_url, conv, plan, extra)
                finally:
                    in_flight -= 1
                results.append(result)
                if result.is_ok and conv.turns_done < turns:
                    think = conv.thinks_s[conv.turns_done - 1]
                    heapq.heappush(due, (time.perf_counter() + think, conv.index, conv))
                elif not result.is_ok:
                    log.warning("conversation %d turn %d failed: %s",
                                conv.index, result.turn, result.error)  # fmt: skip
            elif not due and in_flight == 0:
                return
            else:
                await asyncio.sleep(0.01 if not due else min(0.01, max(0.0, due[0][0] - now)))

    async with make_client(plan.concurrency, plan.timeouts) as client:
        model = await discover_model(client, base_url)
        extra = {"model": model}
        await warm_up(client, base_url, plan.sampling, model)
        start = time.perf_counter()  # the first turns are due now, after the warm-up
        due[:] = [(start, index, conv) for _, index, conv in due]
        heapq.heapify(due)
        try:
            async with asyncio.timeout(plan.timeouts.run_s):
                await asyncio.gather(*(client_loop(client) for _ in range(plan.concurrency)))
        except TimeoutError:
            log.error("run exceeded %.0f s; unfinished turns are missing", plan.timeouts.run_s)
    return results, time.perf_counter() - start


async def run_single_turns(
    base_url: str, conversations: list[Conversation], plan: Plan, extra: dict[str, Any]
) -> list[TurnResult]:
    """Each conversation's next turn, one at a time, without changing the conversations."""
    results = []
    async with make_client(1, plan.timeouts) as client:
        model = await discover_model(client, base_url)
        extra = {"model": model, **extra}
        await warm_up(client, base_url, plan.sampling, model)
        try:
            async with asyncio.timeout(plan.timeouts.run_s):
                for conv in conversations:
                    body = turn_body(conv, plan.sampling, extra)
                    result = TurnResult(conv.index, conv.turns_done + 1)
                    results.append(await stream_turn(client, base_url, body, result, plan.timeouts))
        except TimeoutError:
            log.error("run exceeded %.0f s; unfinished turns are missing", plan.timeouts.run_s)
    return results


async def run_one_at_a_time(
    base_url: str, conversations: list[Conversation], turns: int, plan: Plan
) -> list[TurnResult]:
    """Each conversation's turns back to back, one conversation after another."""
    seq_plan = dataclasses.replace(plan, sampling=plan.sequential_sampling)
    results: list[TurnResult] = []
    async with make_client(1, plan.timeouts) as client:
        model = await discover_model(client, base_url)
        await warm_up(client, base_url, seq_plan.sampling, model)
        for conv in conversations:
            while conv.turns_done < turns:
                result = await _take_turn(client, base_url, conv, seq_plan, {"model": model})
                results.append(result)
                if not result.is_ok:
                    log.warning("conversation %d turn %d failed: %s",
                                conv.index, result.turn, result.error)  # fmt: skip
                    break
    return results


async def fetch_memory(base_url: str) -> Any:
    async with make_client(1, Timeouts()) as client:
        return await server_memory(client, base_url)


# ------------------------------------------------------------------------- summaries


def _ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else value * 1000.0


def _mean(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _cached_share(results: list[TurnResult]) -> float | None:
    pairs = [(r.cached_tokens, r.prompt_tokens) for r in results if r.is_ok]
    if not pairs or any(c is None or p is None for c, p in pairs):
        return None
    total = sum(p for _, p in pairs if p is not None)
    return sum(c for c, _ in pairs if c is not None) / total if total else None


def summarize_multiturn(results: list[TurnResult], wall_s: float, expected: int) -> dict[str, Any]:
    ok = [r for r in results if r.is_ok]
    first = [r.ttft_s for r in ok if r.turn == 1 and r.ttft_s is not None]
    later_ok = [r for r in ok if r.turn >= 2]
    later = [r.ttft_s for r in later_ok if r.ttft_s is not None]
    errors = [r.error for r in results if r.error]
    return {
        "turns_expected": expected,
        "turns_ok": len(ok),
        "turns_failed": len(results) - len(ok),
        "ttft_turn1_p50_ms": _ms(first, 50),
        "ttft_later_p50_ms": _ms(later, 50),
        "ttft_later_p90_ms": _ms(later, 90),
        "cached_share_later": _cached_share(later_ok),
        "cached_source": sorted({r.cached_source for r in ok if r.cached_source}),
        "prompt_tokens_later": sum(r.prompt_tokens or 0 for r in later_ok),
        "cached_tokens_later": sum(r.cached_tokens or 0 for r in later_ok),
        "mean_prompt_tokens_turn1": _mean([r.prompt_tokens for r in ok if r.turn == 1]),
        "mean_prompt_tokens_later": _mean([r.prompt_tokens for r in later_ok]),
        "wall_s": wall_s,
        "first_error": errors[0] if errors else None,
    }


def summarize_single(results: list[TurnResult]) -> dict[str, Any]:
    ok = [r for r in results if r.is_ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    errors = [r.error for r in results if r.error]
    return {
        "n_ok": len(ok),
        "n_failed": len(results) - len(ok),
        "ttft_p50_ms": _ms(ttfts, 50),
        "ttft_p90_ms": _ms(ttfts, 90),
        "cached_share": _cached_share(ok),
        "mean_prompt_tokens": _mean([r.prompt_tokens for r in ok]),
        "first_error": errors[0] if errors else None,
    }


# ------------------------------------------------------------------------- workloads


def _data_dir(config: ServerConfig, scratch: Path, label: str) -> Path | None:
    if not config.uses_data_dir:
        return None
    return Path(tempfile.mkdtemp(prefix=f"{config.name}-{label}-", dir=scratch))


def bench_multiturn(config: ServerConfig, plan: Plan, scratch: Path) -> dict[str, Any]:
    conversations = make_conversations(plan.conversations, plan.turns, plan.think_s, plan.seed)
    data_dir = _data_dir(config, scratch, "multiturn")
    with Server(config, plan, data_dir, cold=False, tag="multiturn") as server:
        results, wall_s = asyncio.run(
            run_conversations(server.base_url, conversations, plan.turns, plan)
        )
        memory = asyncio.run(fetch_memory(server.base_url))
    summary = summarize_multiturn(results, wall_s, plan.conversations * plan.turns)
    return {
        "command": server.argv,
        "startup_s": server.startup_s,
        "summary": summary,
        "memory_after": memory,
        "turns": [dataclasses.asdict(r) | {"content": None} for r in results],
    }


def bench_restart(config: ServerConfig, plan: Plan, scratch: Path) -> dict[str, Any]:
    conversations = make_conversations(
        plan.restart_conversations, RESTART_TURNS + 1, plan.think_s, plan.seed + 1
    )
    data_dir = _data_dir(config, scratch, "restart")
    server = Server(config, plan, data_dir, cold=False, tag="restart")
    try:
        server.start()
        before, _ = asyncio.run(
            run_conversations(server.base_url, conversations, RESTART_TURNS, plan)
        )
        memory_before = asyncio.run(fetch_memory(server.base_url))
        stop_start = time.perf_counter()
        server.stop()  # SIGTERM, waits for the exit
        stop_s = time.perf_counter() - stop_start
        server.start()
        alive = [c for c in conversations if c.turns_done == RESTART_TURNS]
        after = asyncio.run(run_single_turns(server.base_url, alive, plan, {}))
        memory_after = asyncio.run(fetch_memory(server.base_url))
    finally:
        server.stop()
    cold_dir = _data_dir(config, scratch, "cold")
    with Server(config, plan, cold_dir, cold=True, tag="cold") as cold_server:
        cold = asyncio.run(run_single_turns(cold_server.base_url, alive, plan, config.cold_body))
    return {
        "command": server.argv,
        "cold_command": cold_server.argv,
        "cold_body": config.cold_body,
        "startup_s": server.startup_s,
        "stop_s": stop_s,
        "before_ok": sum(1 for r in before if r.is_ok),
        "before_failed": sum(1 for r in before if not r.is_ok),
        "after": summarize_single(after),
        "cold": summarize_single(cold),
        "memory_before_stop": memory_before,
        "memory_after_restart": memory_after,
        "turns_after": [dataclasses.asdict(r) | {"content": None} for r in after],
        "turns_cold": [dataclasses.asdict(r) | {"content": None} for r in cold],
    }


def bench_sequential(config: ServerConfig, plan: Plan, scratch: Path) -> dict[str, Any]:
    """One round: every shape on a fresh server of this config."""
    shapes = {}
    for num_convs, turns in plan.sequential_shapes:
        convs = make_conversations(num_convs, turns, (0.0, 0.0), plan.seed + 2)
        data_dir = _data_dir(config, scratch, f"sequential-{num_convs}x{turns}")
        tag = f"sequential-{num_convs}x{turns}"
        with Server(config, plan, data_dir, cold=False, tag=tag) as server:
            results = asyncio.run(run_one_at_a_time(server.base_url, convs, turns, plan))
        shapes[f"{num_convs}x{turns}"] = summarize_multiturn(results, 0.0, num_convs * turns)
    return {"command": server.argv, "shapes": shapes}


def sequential_rounds(
    names: list[str], configs: dict[str, ServerConfig], plan: Plan, scratch: Path,
    runs: dict[str, Any],
) -> None:
    """`plan.rounds` rounds over the servers, in alternating order; medians over rounds."""
    for r in range(plan.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            log.info("sequential round %d: %s", r + 1, name)
            run = runs.setdefault(name, {"rounds": []})
            run["rounds"].append(bench_sequential(configs[name], plan, scratch))
            run["median"] = {  # so far: an interrupted run still reports what finished
                shape: {
                    key: _median([rd["shapes"][shape][key] for rd in run["rounds"]])
                    for key in ("ttft_turn1_p50_ms", "ttft_later_p50_ms", "cached_share_later")
                }
                for shape in run["rounds"][0]["shapes"]
            }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


# ------------------------------------------------------------------------- tables


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if ours is None or not theirs else f"{ours / theirs:.2f}"


def multiturn_table(title: str, runs: dict[str, dict[str, Any]], skipped: dict[str, str]) -> Table:
    base = runs.get("llama-server", {}).get("summary", {}).get("ttft_later_p50_ms")
    headers = [
        "server", "turns ok", "TTFT turn 1\np50 ms", "TTFT turns>=2\np50 ms",
        "TTFT turns>=2\np90 ms", "cached share\nturns>=2", "wall s",
        "TTFT turns>=2\n/ llama-server",
    ]  # fmt: skip
    rows = []
    notes = []
    for name, run in runs.items():
        s = run["summary"]
        rows.append([
            name, f"{s['turns_ok']}/{s['turns_expected']}", _num(s["ttft_turn1_p50_ms"]),
            _num(s["ttft_later_p50_ms"]), _num(s["ttft_later_p90_ms"]),
            _pct(s["cached_share_later"]), _num(s["wall_s"], 1),
            _ratio(s["ttft_later_p50_ms"], base),
        ])  # fmt: skip
        if s["first_error"]:
            notes.append(f"{name}: {s['turns_failed']} failed turns ({s['first_error']})")
    notes += [f"{name}: skipped - {reason}" for name, reason in skipped.items()]
    notes.append(f"target: pensieve / llama-server TTFT turns>=2 <= {RATIO_TARGETS['multiturn']}")
    return Table(title, headers, rows, notes)


def restart_table(title: str, runs: dict[str, dict[str, Any]], skipped: dict[str, str]) -> Table:
    headers = [
        "server", "turn 4 ok", "after restart\nTTFT p50 ms", "after restart\ncached share",
        "cold\nTTFT p50 ms", "after restart\n/ cold", "stop s",
    ]  # fmt: skip
    rows = []
    notes = []
    for name, run in runs.items():
        after, cold = run["after"], run["cold"]
        rows.append([
            name, f"{after['n_ok']}/{after['n_ok'] + after['n_failed']}",
            _num(after["ttft_p50_ms"]), _pct(after["cached_share"]),
            _num(cold["ttft_p50_ms"]), _ratio(after["ttft_p50_ms"], cold["ttft_p50_ms"]),
            _num(run["stop_s"], 1),
        ])  # fmt: skip
        for label, part in (("after restart", after), ("cold", cold)):
            if part["first_error"]:
                notes.append(f"{name} {label}: {part['n_failed']} failed ({part['first_error']})")
        if run["before_failed"]:
            notes.append(f"{name}: {run['before_failed']} turns before the restart failed")
    notes += [f"{name}: skipped - {reason}" for name, reason in skipped.items()]
    notes.append(f"target: pensieve after restart / cold <= {RATIO_TARGETS['restart']}")
    return Table(title, headers, rows, notes)


def sequential_table(title: str, runs: dict[str, dict[str, Any]],
                     skipped: dict[str, str], plan: Plan) -> Table:
    shapes = [f"{n}x{t}" for n, t in plan.sequential_shapes]
    base = runs.get("llama-server", {}).get("median", {})
    headers = ["server"]
    for shape in shapes:
        headers += [f"{shape} turn 1\nTTFT ms", f"{shape} turns>=2\nTTFT ms",
                    f"{shape} turns>=2\n/ llama-server"]
    rows = []
    for name, run in runs.items():
        row = [name]
        for shape in shapes:
            m = run["median"][shape]
            theirs = base.get(shape, {}).get("ttft_later_p50_ms")
            row += [_num(m["ttft_turn1_p50_ms"]), _num(m["ttft_later_p50_ms"]),
                    _ratio(m["ttft_later_p50_ms"], theirs)]
        rows.append(row)
    notes = [f"{name}: skipped - {reason}" for name, reason in skipped.items()]
    notes.append("TTFT: p50 within a round, median over rounds; servers alternate order "
                 "between rounds. Target: pensieve turns>=2 / llama-server <= 1.")
    return Table(title, headers, rows, notes)


# ------------------------------------------------------------------------- main


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with`/`finally` that stop servers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                        help="comma-separated, from: " + ", ".join(SERVER_CONFIGS))  # fmt: skip
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help="comma-separated, from: " + ", ".join(WORKLOADS))  # fmt: skip
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server-np", type=int, default=8, help="llama-server slots")
    parser.add_argument("--conversations", type=int, default=24, help="multiturn: conversations")
    parser.add_argument("--turns", type=int, default=5, help="multiturn: turns each")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--think", default="1,3",
                        help="think time between turns, seconds: MIN,MAX or one value")  # fmt: skip
    parser.add_argument("--restart-conversations", type=int, default=8,
                        help="restart: conversations (3 turns, restart, 4th turn)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=48, help="output tokens per turn")
    parser.add_argument("--sequential-max-tokens", type=int, default=80,
                        help="sequential: output tokens per turn (64-96 is a chat answer)")
    parser.add_argument("--sequential-shapes", default="1x5,12x3",
                        help="sequential: CONVERSATIONSxTURNS,...")
    parser.add_argument("--rounds", type=int, default=2,
                        help="sequential: rounds, servers in alternating order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds per phase")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--stop-grace", type=float, default=60.0,
                        help="seconds a server may take to exit after SIGTERM")  # fmt: skip
    parser.add_argument("--json-out", type=Path, default=LOG_DIR / "multiturn-latest.json")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if bad := [s for s in servers if s not in SERVER_CONFIGS]:
        raise SystemExit(f"unknown server(s) {bad}; choose from {list(SERVER_CONFIGS)}")
    if bad := [w for w in workloads if w not in WORKLOADS]:
        raise SystemExit(f"unknown workload(s) {bad}; choose from {list(WORKLOADS)}")
    if not args.model.is_file():
        raise SystemExit(f"model file not found: {args.model}")
    think = [float(v) for v in args.think.split(",") if v.strip()]
    return Plan(
        servers=servers,
        workloads=workloads,
        model=args.model.resolve(),
        threads=args.threads,
        llama_server_parallel=args.llama_server_np,
        conversations=args.conversations,
        turns=args.turns,
        concurrency=args.concurrency,
        think_s=(think[0], think[-1]),
        restart_conversations=args.restart_conversations,
        sampling=SamplingConfig(max_tokens=args.max_tokens),
        seed=args.seed,
        timeouts=Timeouts(request_s=args.request_timeout, run_s=args.run_timeout),
        ready_timeout_s=args.ready_timeout,
        stop_grace_s=args.stop_grace,
        rounds=args.rounds,
        sequential_sampling=SamplingConfig(max_tokens=args.sequential_max_tokens),
        sequential_shapes=tuple(
            (int(n), int(t)) for n, t in (x.split("x") for x in args.sequential_shapes.split(","))
        ),
    )


def run_all(plan: Plan, out: dict[str, Any]) -> None:
    configs = server_configs()
    benches = {"multiturn": bench_multiturn, "restart": bench_restart}
    scratch = Path(tempfile.mkdtemp(prefix="pensieve-multiturn-"))
    try:
        for workload in plan.workloads:
            runs = out["results"].setdefault(workload, {})
            skipped = out["skipped"].setdefault(workload, {})
            if workload == "sequential":
                names = [n for n in plan.servers if configs[n].spec.is_installed]
                skipped.update({n: f"{configs[n].spec.executable} not found"
                                for n in plan.servers if n not in names})
                sequential_rounds(names, configs, plan, scratch, runs)
                continue
            for name in plan.servers:
                config = configs[name]
                if not config.spec.is_installed:
                    skipped[name] = f"{config.spec.executable} not found"
                    continue
                busy = busy_cpu_fraction()
                out["busy_cpu_before"].setdefault(workload, {})[name] = busy
                if busy is not None and busy > 0.15:
                    log.warning("CPUs %.0f%% busy before %s: figures will be low", busy * 100, name)
                log.info("%s: %s", workload, name)
                try:
                    runs[name] = benches[workload](config, plan, scratch)
                except ServerNotReady as exc:
                    skipped[name] = f"not ready: {str(exc)[:MAX_ERROR_CHARS]}"
                    log.error("%s %s: %s", workload, name, exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    plan = plan_from_args(args)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    out: dict[str, Any] = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_revision(),
            "plan": dataclasses.asdict(plan) | {"model": str(plan.model)},
        },
        "results": {},
        "skipped": {},
        "busy_cpu_before": {},
        "interrupted": False,
    }
    try:
        run_all(plan, out)
    except (KeyboardInterrupt, SystemExit):
        log.warning("interrupted: reporting what finished so far")
        out["interrupted"] = True
    common = (
        f"{plan.model.name}, {plan.threads} threads, max_tokens {plan.sampling.max_tokens}, "
        f"llama-server -np {plan.llama_server_parallel}, git {out['meta']['git']}"
    )
    tables = []
    if "multiturn" in out["results"]:
        title = (
            f"multi-turn: {plan.conversations} conversations x {plan.turns} turns, "
            f"{plan.concurrency} clients, think {plan.think_s[0]:g}-{plan.think_s[1]:g} s; "
            + common
        )
        tables.append(multiturn_table(title, out["results"]["multiturn"],
                                      out["skipped"].get("multiturn", {})))  # fmt: skip
    if "restart" in out["results"]:
        title = (
            f"restart: {plan.restart_conversations} conversations x {RESTART_TURNS} turns, "
            f"restart, turn 4 one at a time; " + common
        )
        tables.append(restart_table(title, out["results"]["restart"],
                                    out["skipped"].get("restart", {})))  # fmt: skip
    if "sequential" in out["results"]:
        title = (
            "sequential: " + " and ".join(f"{n} x {t} turns" for n, t in plan.sequential_shapes)
            + ", one conversation at a time, "
            f"max_tokens {plan.sequential_sampling.max_tokens}, "
            f"{plan.rounds} rounds; " + common
        )
        tables.append(sequential_table(title, out["results"]["sequential"],
                                       out["skipped"].get("sequential", {}), plan))  # fmt: skip
    for table in tables:
        print_table(table)
        if args.markdown:
            print(render_markdown(table))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    log.info("results written to %s", args.json_out)
    return 0 if out["results"] and not out["interrupted"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
