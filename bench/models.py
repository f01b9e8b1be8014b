"""Multi-model lifecycle numbers: each model's load time, resident memory and budget estimate,
the cold first request (load included) and a warm one, with SmolLM2-135M-Instruct and
Gemma 3 270M served by one Pensieve server (one worker each).

Run with the main venv (it has Pensieve itself):

    .venv/bin/python bench/models.py [--threads 2] [--json bench/.logs/models.json]

Wrap it in the CPU lock on a shared machine: `flock /tmp/pensieve-cpu.lock ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support
from servers import REPO_DIR, ServerProcess, free_port  # noqa: E402

from pensieve.config import default_data_dir  # noqa: E402
from pensieve.store.default_model import DEFAULT_MODEL_NAME  # noqa: E402
from pensieve.store.store import ModelStore  # noqa: E402
from tests.support.gemma_model import ensure_gemma  # noqa: E402

GEMMA = "gemma3:270m"
PROMPT = "The capital of France is"


def timed_completion(client: httpx.Client, model: str) -> tuple[float, int]:
    """Seconds for a 16-token greedy completion, and the tokens it produced."""
    started = time.perf_counter()
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                             "max_tokens": 16, "temperature": 0,
                                             "ignore_eos": True})
    r.raise_for_status()
    return time.perf_counter() - started, r.json()["usage"]["completion_tokens"]


def measure(base_url: str) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=base_url, timeout=300) as client:
        for model in (DEFAULT_MODEL_NAME, GEMMA):
            cold_s, _ = timed_completion(client, model)
            warm_s, num_tokens = timed_completion(client, model)
            rows.append({"model": model, "cold_request_s": cold_s, "warm_request_s": warm_s,
                         "warm_tok_per_s": num_tokens / warm_s})
        ps = {m["name"]: m for m in client.get("/api/ps").json()["models"]}
    for row in rows:
        info = ps[row["model"]]
        row.update(load_s=info["load_seconds"], resident_bytes=info["resident_bytes"],
                   budget_bytes=info["size"], context=info["context_length"])
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table("model", "load s", "resident MiB", "budget MiB", "context",
                  "cold request s", "warm request s", "warm tok/s", title="models")
    for r in rows:
        table.add_row(r["model"], f"{r['load_s']:.2f}", f"{r['resident_bytes'] / 2**20:.0f}",
                      f"{r['budget_bytes'] / 2**20:.0f}", str(r["context"]),
                      f"{r['cold_request_s']:.2f}", f"{r['warm_request_s']:.2f}",
                      f"{r['warm_tok_per_s']:.0f}")
    Console(width=120).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    gemma = ensure_gemma(default_data_dir())
    with tempfile.TemporaryDirectory(prefix="pensieve-bench-models-") as tmp:
        data = Path(tmp)
        ModelStore(data / "models").import_file(gemma, GEMMA, link=True)
        port = free_port()
        argv = [str(REPO_DIR / ".venv/bin/pensieve"), "serve", "--port", str(port),
                "--data-dir", str(data), "--threads", str(args.threads), "--parallel", "4",
                "--ctx-size", str(args.ctx_size), "--keep-alive", "-1"]
        with ServerProcess(argv, REPO_DIR / "bench/.logs/models-server.log", port,
                           "/health") as server:
            server.wait_ready(300)
            rows = measure(server.base_url)
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
