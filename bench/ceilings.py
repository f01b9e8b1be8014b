"""llama.cpp's raw ceilings on this box, for reading the serving table against.

Runs the llama-bench and llama-batched-bench binaries built by bench/build_llama_server.sh:
single-sequence prefill and decode tok/s, then aggregate decode tok/s with N sequences
decoding together in one context (the best a server could do at concurrency N).

    python bench/ceilings.py --threads 2 --parallel 1,4,8,16
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import Table, print_table
from servers import BENCH_DIR

log = logging.getLogger("bench.ceilings")

BIN_DIR = BENCH_DIR / ".build" / "cmake" / "bin"
DEFAULT_MODEL = Path("/root/.local/share/pensieve/default/SmolLM2-135M-Instruct.Q4_1.gguf")
COMMAND_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Ceiling:
    what: str
    tok_s: float
    detail: str


def _run(argv: list[str]) -> str:
    log.info("running: %s", " ".join(argv))
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def single_sequence(model: Path, threads: int, prompt_sizes: str, num_gen: int) -> list[Ceiling]:
    """Prefill (ppN) and decode (tgN) of one sequence, from llama-bench's JSON."""
    argv = [str(BIN_DIR / "llama-bench"), "-m", str(model), "-t", str(threads)]
    argv += ["-p", prompt_sizes, "-n", str(num_gen), "-r", "3", "-o", "json"]
    ceilings = []
    for test in json.loads(_run(argv)):
        kind = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        label = "prefill" if test["n_prompt"] else "decode"
        detail = f"llama-bench {kind}, +-{test['stddev_ts']:.1f}"
        ceilings.append(Ceiling(f"1 sequence {label} ({kind})", test["avg_ts"], detail))
    return ceilings


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def batched_decode(
    model: Path, threads: int, parallel: str, num_prompt: int, num_gen: int
) -> list[Ceiling]:
    """Aggregate decode tok/s of N sequences in one context, from llama-batched-bench."""
    argv = [str(BIN_DIR / "llama-batched-bench"), "-m", str(model), "-t", str(threads)]
    argv += ["-tb", str(threads), "-c", "16384", "-b", "2048", "-ub", "512"]
    argv += ["-npp", str(num_prompt), "-ntg", str(num_gen), "-npl", parallel]
    argv += ["--output-format", "jsonl"]
    return [
        Ceiling(
            f"{row['pl']} sequence{'s' if row['pl'] > 1 else ''} decoding together",
            row["speed_tg"],
            f"llama-batched-bench pp{row['pp']} tg{row['tg']}, prefill {row['speed_pp']:.0f} tok/s",
        )
        for row in _jsonl(_run(argv))
    ]


def workload_ceiling(
    model: Path, threads: int, concurrencies: list[int], num_prompt: int, num_gen: int
) -> dict[int, float]:
    """Output tok/s llama.cpp itself reaches on a serving workload's shape, per concurrency.

    llama-batched-bench prefills N prompts of `num_prompt` tokens in one batch, then decodes
    `num_gen` tokens for all N together: the ideal schedule of N streams, with no HTTP, no
    arrivals and no sampling beyond greedy. Output tokens over its total time is what no
    server on this box and thread count can much exceed for that workload.
    """
    argv = [str(BIN_DIR / "llama-batched-bench"), "-m", str(model), "-t", str(threads)]
    argv += ["-tb", str(threads), "-c", "16384", "-b", "2048", "-ub", "512", "-fa", "on"]
    argv += ["-npp", str(num_prompt), "-ntg", str(num_gen)]
    argv += ["-npl", ",".join(str(c) for c in concurrencies), "--output-format", "jsonl"]
    return {row["pl"]: row["pl"] * row["tg"] / row["t"] for row in _jsonl(_run(argv))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-sizes", default="128,512", help="llama-bench -p")
    parser.add_argument("--num-gen", type=int, default=128, help="decode tokens per sequence")
    parser.add_argument("--parallel", default="1,4,8,16", help="llama-batched-bench -npl")
    parser.add_argument("--batched-prompt", type=int, default=64, help="prompt tokens per sequence")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if not (BIN_DIR / "llama-bench").is_file():
        log.error("llama-bench not built; run: bash bench/build_llama_server.sh")
        return 1
    ceilings = single_sequence(args.model, args.threads, args.prompt_sizes, args.num_gen)
    if (BIN_DIR / "llama-batched-bench").is_file():
        ceilings += batched_decode(
            args.model, args.threads, args.parallel, args.batched_prompt, args.num_gen
        )
    else:
        log.warning("llama-batched-bench not built; run: bash bench/build_llama_server.sh")
    title = f"llama.cpp ceilings: {args.model.name}, {args.threads} threads"
    rows = [[c.what, f"{c.tok_s:.1f}", c.detail] for c in ceilings]
    print_table(Table(title, ["what", "tok/s", "how"], rows, []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
