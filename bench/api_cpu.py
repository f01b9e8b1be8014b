"""CPU time the API process spends per streamed token (the worker's decoding not counted).

Starts `pensieve serve` from one or more source trees, alternately, and streams fixed-length
chat answers (temperature 0, ignore_eos) at each concurrency; reads the API process's user +
system CPU time from /proc before and after, and divides by the tokens streamed. Median of
rounds. Compare two revisions by giving each a source tree (a git worktree):

    git worktree add /tmp/pensieve-old <rev>
    .venv/bin/python bench/api_cpu.py --src new=. --src old=/tmp/pensieve-old --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import REPO_DIR, ServerProcess, free_port  # noqa: E402

from pensieve.config import default_data_dir  # noqa: E402
from pensieve.store.default_model import ensure_default_model  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
MIN_TOKENS = 2048  # per measurement, so the 10 ms tick resolution stays under 1%


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def stream_one(http: httpx.AsyncClient, url: str, max_tokens: int) -> int:
    body = {"model": "m", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Tell me a story."}]}
    num = 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                num += bool(choices and choices[0]["delta"].get("content"))
    return num


async def measure(base_url: str, pid: int, concurrency: int, max_tokens: int) -> float:
    """Milliseconds of API-process CPU per streamed token at this concurrency."""
    per_stream = -(-MIN_TOKENS // (concurrency * max_tokens))
    url = f"{base_url}/v1/chat/completions"

    async def client_loop(http: httpx.AsyncClient) -> int:
        return sum([await stream_one(http, url, max_tokens) for _ in range(per_stream)])

    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        await stream_one(http, url, 8)  # warm up
        before = cpu_seconds(pid)
        counts = await asyncio.gather(*(client_loop(http) for _ in range(concurrency)))
        spent = cpu_seconds(pid) - before
    return spent * 1000 / max(1, sum(counts))


def serve(src: Path, model: Path, threads: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    argv = [str(REPO_DIR / ".venv/bin/python"), "-m", "pensieve.cli", "serve", "--port",
            str(port), "--model", str(model), "--model-alias", "m", "--threads", str(threads),
            "--parallel", "16", "--ctx-size", "16384", "--no-prefix-cache",
            "--data-dir", str(log_dir / f"data-{port}")]
    os.environ["PYTHONPATH"] = str(src / "src")
    return ServerProcess(argv, log_dir / f"api_cpu-{src.name}.log", port, "/health")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", default=[],
                        help="label=source tree to serve from (default: this checkout)")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    sources = [s.split("=", 1) for s in args.src] or [["this", str(REPO_DIR)]]
    levels = [int(c) for c in args.concurrency.split(",")]
    model = ensure_default_model(default_data_dir())
    log_dir = REPO_DIR / "bench/.logs"
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for label, src in sources:
            with serve(Path(src).resolve(), model, args.threads, log_dir) as server:
                server.wait_ready(180)
                pid = server._process.pid  # type: ignore[union-attr]  # the API process
                for c in levels:
                    ms = asyncio.run(measure(server.base_url, pid, c, args.max_tokens))
                    results.setdefault((label, c), []).append(ms)
                    print(f"{label} c={c}: {ms:.3f} ms/token", flush=True)
            time.sleep(1)
    print("\n| source | " + " | ".join(f"{c} streams ms/token" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for label, _ in sources:
        cells = [f"{statistics.median(results[(label, c)]):.3f}" for c in levels]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
