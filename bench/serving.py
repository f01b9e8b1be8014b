"""Run the same streaming workloads against Pensieve, llama-server and llama-cpp-python.

Servers run one after another (never together), each on a free 127.0.0.1 port with its
output in bench/.logs/. Prints one comparison table and writes the results as JSON.

    python bench/serving.py --servers pensieve,llama-server,llama-cpp-python --concurrency 1,4,8,16
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ceilings import BIN_DIR as LLAMA_BIN_DIR
from ceilings import workload_ceiling
from loadgen import (
    RunSummary,
    Timeouts,
    add_workload_args,
    format_summary,
    run_workload,
    sampling_from_args,
    timeouts_from_args,
)
from report import build_table, print_table, render_markdown
from servers import (
    BENCH_DIR,
    REPO_DIR,
    SERVERS,
    ServerNotReady,
    ServerProcess,
    ServerSpec,
    free_port,
)
from workload import SamplingConfig

log = logging.getLogger("bench.serving")

DEFAULT_MODEL = Path("/root/.local/share/pensieve/default/SmolLM2-135M-Instruct.Q4_1.gguf")
LOG_DIR = BENCH_DIR / ".logs"
WARMUP_TOKENS = 8
BUSY_WARNING = 0.15  # share of CPU time used by others before a server starts


@dataclasses.dataclass(frozen=True, slots=True)
class BenchPlan:
    """Everything one invocation runs, fixed before any server starts."""

    servers: list[str]
    model: Path
    threads: int
    llama_server_parallel: int
    concurrencies: list[int]
    num_requests: dict[int, int]
    sampling: SamplingConfig
    seed: int
    timeouts: Timeouts
    ready_timeout_s: float


@dataclasses.dataclass(slots=True)
class BenchResults:
    results: dict[str, dict[int, RunSummary]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    commands: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    startup_s: dict[str, float] = dataclasses.field(default_factory=dict)
    busy_before: dict[str, float | None] = dataclasses.field(default_factory=dict)
    rounds: dict[str, dict[int, list[RunSummary]]] = dataclasses.field(default_factory=dict)
    ceilings: dict[int, float] = dataclasses.field(default_factory=dict)
    ceiling_prompt_tokens: int | None = None
    is_interrupted: bool = False
    started_at: str = dataclasses.field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )


def busy_cpu_fraction(interval_s: float = 1.0) -> float | None:
    """Share of all CPU time spent busy over a short interval (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    try:
        total_0, idle_0 = sample()
        time.sleep(interval_s)
        total_1, idle_1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total_1 - total_0
    return None if total <= 0 else 1.0 - (idle_1 - idle_0) / total


def requests_for(concurrency: int, fixed: int | None) -> int:
    """Default: max(2 * concurrency, 8) requests, so every stream sends at least two."""
    return fixed if fixed is not None else max(2 * concurrency, 8)


async def _run_workloads(
    name: str, base_url: str, plan: BenchPlan, runs: dict[int, RunSummary]
) -> None:
    """Warm up, then run each workload, filling `runs` as they finish (kept if interrupted)."""
    warmup_sampling = dataclasses.replace(plan.sampling, max_tokens=WARMUP_TOKENS)
    warmup = await run_workload(base_url, 1, 1, warmup_sampling, seed=plan.seed + 999_999)
    if warmup.num_failed:
        log.error("warm-up request failed: %s", warmup.first_error)
    for concurrency in plan.concurrencies:
        runs[concurrency] = await run_workload(
            base_url,
            concurrency,
            plan.num_requests[concurrency],
            plan.sampling,
            seed=plan.seed * 1000 + concurrency,  # distinct prompts in every workload
            timeouts=plan.timeouts,
        )
        log.info("%s\n%s", name, format_summary(runs[concurrency]))


def bench_server(spec: ServerSpec, plan: BenchPlan, out: BenchResults) -> None:
    """Start one server, run every workload against it, stop it; record a skip on failure."""
    if not spec.is_installed:
        out.skipped[spec.name] = f"{spec.executable} not found; {spec.build_hint}"
        log.warning("skipping %s: %s", spec.name, out.skipped[spec.name])
        return
    busy = out.busy_before[spec.name] = busy_cpu_fraction()
    if busy is not None and busy > BUSY_WARNING:
        log.warning(
            "the CPUs were %.0f%% busy before %s started: figures will be low",
            busy * 100,
            spec.name,
        )
    port = free_port()
    argv = spec.argv(
        model=plan.model, port=port, threads=plan.threads, parallel=plan.llama_server_parallel
    )
    out.commands[spec.name] = argv
    log_path = LOG_DIR / f"{spec.name}.log"
    try:
        with (
            tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-") as state,
            ServerProcess(
                argv + ([spec.data_dir_flag, state] if spec.data_dir_flag else []),
                log_path,
                port,
                spec.ready_path,
            ) as server,
        ):
            out.startup_s[spec.name] = server.wait_ready(plan.ready_timeout_s)
            log.info("%s ready after %.1f s", spec.name, out.startup_s[spec.name])
            runs = out.results.setdefault(spec.name, {})
            asyncio.run(_run_workloads(spec.name, server.base_url, plan, runs))
    except ServerNotReady as exc:
        out.skipped[spec.name] = f"not ready ({exc}); see {log_path}"
        log.error("skipping %s: %s", spec.name, exc)


def median_runs(rounds: dict[str, dict[int, list[RunSummary]]]) -> dict[str, dict[int, RunSummary]]:
    """Per server and workload, the round whose output tok/s is the median (the lower middle
    one for an even count): one real run, with its own latencies, rather than a blend."""
    return {
        name: {
            c: sorted(runs, key=lambda s: s.output_tok_s)[(len(runs) - 1) // 2]
            for c, runs in by_c.items()
        }
        for name, by_c in rounds.items()
    }


def measure_ceilings(plan: BenchPlan, out: BenchResults) -> None:
    """llama.cpp's own output tok/s on the workload's shape, from llama-batched-bench.

    Its prompts are as long as the fewest prompt tokens any server had to compute per request
    (usage: prompt minus cached tokens; every request shares the chat template's system prompt,
    which servers cache), so the ceiling errs high rather than low.
    """
    if not (LLAMA_BIN_DIR / "llama-batched-bench").is_file():
        log.warning("llama-batched-bench not built (bash bench/build_llama_server.sh): no ceiling")
        return
    lengths = [
        s.mean_uncached_prompt_tokens
        for runs in out.results.values()
        for s in runs.values()
        if s.mean_uncached_prompt_tokens is not None
    ]
    if not lengths:
        log.warning("no server reported usage: no prompt length for the ceiling")
        return
    out.ceiling_prompt_tokens = max(1, round(min(lengths)))
    try:
        out.ceilings = workload_ceiling(
            plan.model,
            plan.threads,
            plan.concurrencies,
            out.ceiling_prompt_tokens,
            plan.sampling.max_tokens,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log.error("llama-batched-bench failed: %s", exc)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with ServerProcess`, which stops the server


def git_revision() -> str | None:
    """The repository's commit, with '-dirty' when the work tree has changes."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _metadata(plan: BenchPlan, out: BenchResults) -> dict[str, Any]:
    return {
        "started_at": out.started_at,
        "git": git_revision(),
        "host": platform.node(),
        "machine": platform.machine(),
        "model": str(plan.model),
        "threads": plan.threads,
        "llama_server_parallel": plan.llama_server_parallel,
        "seed": plan.seed,
        "sampling": dataclasses.asdict(plan.sampling),
        "num_requests": plan.num_requests,
    }


def write_json(path: Path, plan: BenchPlan, out: BenchResults) -> None:
    payload = {
        "meta": _metadata(plan, out),
        "commands": out.commands,
        "startup_s": out.startup_s,
        "busy_cpu_before": out.busy_before,
        "interrupted": out.is_interrupted,
        "skipped": out.skipped,
        "ceilings": {"prompt_tokens": out.ceiling_prompt_tokens, "out_tok_s": out.ceilings},
        "rounds": {
            name: {c: [s.output_tok_s for s in runs] for c, runs in by_c.items()}
            for name, by_c in out.rounds.items()
        },
        "results": {
            name: [s.to_dict() for s in runs.values()] for name, runs in out.results.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    log.info("results written to %s", path)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS)
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="GGUF file every server loads"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated stream counts")
    parser.add_argument(
        "--num-requests", type=int, default=None, help="per workload; default max(2c, 8)"
    )
    parser.add_argument(
        "--llama-server-np", type=int, default=8, help="llama-server slots (-np), e.g. 16"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness"
    )
    parser.add_argument("--json-out", type=Path, default=LOG_DIR / "serving-latest.json")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every server this many times, alternating, and report each workload's "
        "median round (this host varies 10-20%% between runs)",
    )
    parser.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip llama-batched-bench's run of the same workload shape (the ceiling columns)",
    )
    add_workload_args(parser)
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in servers if name not in SERVERS]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {list(SERVERS)}")
    if not args.model.is_file():
        raise SystemExit(f"model file not found: {args.model}")
    concurrencies = _int_list(args.concurrency)
    return BenchPlan(
        servers=servers,
        model=args.model.resolve(),
        threads=args.threads,
        llama_server_parallel=args.llama_server_np,
        concurrencies=concurrencies,
        num_requests={c: requests_for(c, args.num_requests) for c in concurrencies},
        sampling=sampling_from_args(args),
        seed=args.seed,
        timeouts=timeouts_from_args(args),
        ready_timeout_s=args.ready_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    plan = plan_from_args(args)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    out = BenchResults()
    try:
        for round_index in range(args.rounds):
            if args.rounds > 1:
                log.info("round %d of %d", round_index + 1, args.rounds)
            for name in plan.servers:
                bench_server(SERVERS[name], plan, out)
                for concurrency, summary in out.results.get(name, {}).items():
                    out.rounds.setdefault(name, {}).setdefault(concurrency, []).append(summary)
                out.results.pop(name, None)
    except (KeyboardInterrupt, SystemExit):
        log.warning("interrupted: reporting what finished so far")
        out.is_interrupted = True
    out.results = median_runs(out.rounds)
    if not args.no_ceiling and not out.is_interrupted and out.results:
        measure_ceilings(plan, out)
    title = (
        f"{plan.model.name}, {plan.threads} threads, max_tokens {plan.sampling.max_tokens}, "
        f"llama-server -np {plan.llama_server_parallel}, git {git_revision()}, {out.started_at}"
        + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    busy_notes = [
        f"{name}: CPUs {busy:.0%} busy before it started (others' load; figures are low)"
        for name, busy in out.busy_before.items()
        if busy is not None and busy > BUSY_WARNING
    ]
    if out.ceilings:
        busy_notes.append(
            f"ceiling: llama-batched-bench, {out.ceiling_prompt_tokens} prompt tokens and "
            f"{plan.sampling.max_tokens} generated per sequence, all sequences prefilled in one "
            "batch then decoded together (no HTTP); a server/ceiling near 1 is at what this box "
            "can do for the workload"
        )
    table = build_table(
        title, out.results, plan.concurrencies, out.skipped, busy_notes, ceilings=out.ceilings
    )
    print_table(table)
    if args.markdown:
        print(render_markdown(table))
    write_json(args.json_out, plan, out)
    return 0 if out.results and not out.is_interrupted else 1


if __name__ == "__main__":
    raise SystemExit(main())
