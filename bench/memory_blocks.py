"""What KV blocks save against whole snapshots: bytes written per turn, and shared prompts.

Two Pensieve servers of the same build, one after another (in alternating order when
`--rounds` > 1; the byte counts do not depend on timing): `blocks` (the defaults) and
`snapshots` (`--memory-block-tokens 0`, the earlier design that rewrites a conversation's whole
state after every turn).

- growth: one conversation of 20 turns, one at a time. After each turn the server's memory
  counters (/admin/memory, which first saves what the context holds) give the bytes copied into
  RAM and queued for disk by that turn. Blocks should follow the new tokens; snapshots grow with
  the history.
- shared: N conversations (default 100) of one turn each, all opening with the same
  ~1,500-token system prompt. Reports the RAM and disk the memory holds afterwards against N
  times the prompt's KV. The snapshot server runs `--shared-snapshot-conversations` of them
  (default 10; every one is a full copy of the prompt) and its bytes per conversation are shown.

    python bench/memory_blocks.py                     # both parts, 2 rounds
    python bench/memory_blocks.py --parts growth --turns 8 --rounds 1
    python bench/memory_blocks.py --block-sizes 32,64,128,256 --no-snapshots   # the block size
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from report import Table, print_table, render_markdown
from servers import SERVERS, ServerProcess, free_port
from serving import DEFAULT_MODEL, LOG_DIR, git_revision

log = logging.getLogger("bench.memory_blocks")

CONFIGS: dict[str, tuple[str, ...]] = {
    "blocks": (),
    "snapshots": ("--memory-block-tokens", "0"),
}


def set_block_sizes(sizes: list[int]) -> None:
    """`--block-sizes 32,64,128`: one `blocks-N` server per size instead of the default's."""
    if sizes:
        del CONFIGS["blocks"]
        for n in sizes:
            CONFIGS[f"blocks-{n}"] = ("--memory-block-tokens", str(n))


def block_configs() -> list[str]:
    return [n for n in CONFIGS if n.startswith("blocks")]
QUESTIONS = ("Tell me one fact about owls.", "And one about foxes?", "Which of them is older?",
             "Name a third animal.", "Why that one?")
SHARED_PROMPT_SENTENCE = (
    "Rule {i}: answer customers of the Northwind mountain shop politely, precisely and briefly, "
    "and never invent order numbers, delivery dates or prices that you were not given. ")


def shared_prompt(num_rules: int) -> str:
    return "".join(SHARED_PROMPT_SENTENCE.format(i=i) for i in range(num_rules))


class Pensieve:
    def __init__(self, name: str, model: Path, threads: int, data_dir: Path,
                 part: str) -> None:
        self.port = free_port()
        argv = SERVERS["pensieve"].argv(model=model, port=self.port, threads=threads, parallel=1)
        argv += [*CONFIGS[name], "--data-dir", str(data_dir)]
        self.argv = argv
        self.process = ServerProcess(argv, LOG_DIR / f"memory-blocks-{name}-{part}.log", self.port,
                                     "/health")
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = ""

    def __enter__(self) -> Pensieve:
        self.process.start()
        self.process.wait_ready(180)
        self.model = httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop(grace_s=60)

    def chat(self, client: httpx.Client, messages: list[dict[str, str]],
             max_tokens: int) -> dict[str, Any]:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0}
        r = client.post(f"{self.url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    def memory(self, client: httpx.Client) -> dict[str, Any]:
        """The memory counters, after the server has saved what its context holds."""
        r = client.get(f"{self.url}/admin/memory", timeout=120)
        r.raise_for_status()
        return dict(r.json()["stats"] or {})


def written(stats: dict[str, Any]) -> tuple[int, int]:
    """Bytes copied into RAM and queued for disk so far, blocks and snapshots together."""
    ram = int(stats.get("bytes_to_ram", 0)) + int(stats.get("snapshot_bytes_to_ram", 0))
    disk = int(stats.get("bytes_to_disk", 0)) + int(stats.get("snapshot_bytes_to_disk", 0))
    return ram, disk


def growth(name: str, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    rows = []
    data_dir = Path(tempfile.mkdtemp(dir=scratch))
    with Pensieve(name, args.model, args.threads, data_dir, "growth") as srv, \
            httpx.Client() as client:
        messages = [{"role": "system", "content": "You are a concise assistant."}]
        before = written(srv.memory(client))
        for t in range(args.turns):
            messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            reply = srv.chat(client, messages, args.max_tokens)
            messages.append({"role": "assistant",
                             "content": reply["choices"][0]["message"]["content"]})
            after = written(srv.memory(client))
            rows.append({"turn": t + 1, "prompt_tokens": reply["usage"]["prompt_tokens"],
                         "ram_bytes": after[0] - before[0], "disk_bytes": after[1] - before[1]})
            before = after
    return rows


def shared(name: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    num = (args.shared_conversations if name.startswith("blocks")
           else args.shared_snapshot_conversations)
    prompt = shared_prompt(args.shared_rules)
    data_dir = Path(tempfile.mkdtemp(dir=scratch))
    with Pensieve(name, args.model, args.threads, data_dir, "shared") as srv, \
            httpx.Client() as client:
        start = time.perf_counter()
        prompt_tokens = 0
        for i in range(num):
            reply = srv.chat(client, [{"role": "system", "content": prompt},
                                      {"role": "user", "content": f"Question {i}: hello?"}],
                             args.shared_max_tokens)
            prompt_tokens = max(prompt_tokens, reply["usage"]["prompt_tokens"])
        stats = srv.memory(client)
        wall = time.perf_counter() - start
    return {"conversations": num, "prompt_tokens": prompt_tokens, "wall_s": wall,
            "stats": stats}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"growth": {n: [] for n in CONFIGS}, "shared": {n: [] for n in CONFIGS}}
    with tempfile.TemporaryDirectory(prefix="pensieve-blocks-") as tmp:
        scratch = Path(tmp)
        for r in range(args.rounds):
            names = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]
            for name in names:
                if "growth" in args.parts:
                    log.info("round %d growth %s", r + 1, name)
                    out["growth"][name].append(growth(name, args, scratch))
                    _dump(args, out)
                if "shared" in args.parts:
                    log.info("round %d shared %s", r + 1, name)
                    out["shared"][name].append(shared(name, args, scratch))
                    _dump(args, out)
    return out


def _dump(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Results so far (a long run on a busy box may not finish)."""
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"git": git_revision(), "args": vars(args) | {
        "model": str(args.model), "json_out": str(args.json_out)}, **out}, indent=2,
        default=str) + "\n")


def _kib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:,.0f}"


def growth_table(runs: dict[str, list[list[dict[str, Any]]]]) -> Table:
    turns = len(next(iter(runs.values()))[0])
    rows = []
    for t in range(turns):
        row = [str(t + 1), str(runs[block_configs()[0]][0][t]["prompt_tokens"])]
        for name in CONFIGS:
            for key in ("ram_bytes", "disk_bytes"):
                row.append(_kib(statistics.median(rd[t][key] for rd in runs[name])))
        rows.append(row)
    totals = ["total", ""]
    for name in CONFIGS:
        for key in ("ram_bytes", "disk_bytes"):
            totals.append(_kib(statistics.median(sum(x[key] for x in rd) for rd in runs[name])))
    rows.append(totals)
    headers = ["turn", "prompt\ntokens"] + [f"{name}\n{tier} KiB" for name in CONFIGS
                                            for tier in ("RAM", "disk")]
    return Table("bytes written per turn, one 20-turn conversation (median over rounds)",
                 headers, rows, ["disk: file bytes queued, headers included"])


def shared_table(runs: dict[str, list[dict[str, Any]]]) -> Table:
    rows = []
    for name in CONFIGS:
        if not runs[name]:
            continue
        first = runs[name][0]
        n, tokens = first["conversations"], first["prompt_tokens"]
        ram = statistics.median(int(r["stats"].get("ram_bytes", 0)) for r in runs[name])
        disk = statistics.median(int(r["stats"].get("disk_bytes", 0)) for r in runs[name])
        first_blocks = runs[block_configs()[0]]
        per_token = int(first_blocks[0]["stats"].get("kv_bytes_per_token", 0)) \
            if first_blocks else 0
        naive = n * tokens * per_token
        rows.append([name, str(n), str(tokens), f"{ram / 2**20:,.1f}", f"{disk / 2**20:,.1f}",
                     f"{naive / 2**20:,.1f}", f"{ram / naive:.3f}" if naive else "-",
                     str(first["stats"].get("blocks", "-")),
                     str(first["stats"].get("shared_blocks", "-"))])
    headers = ["memory", "conversations", "prompt\ntokens", "RAM MiB", "disk MiB",
               "N x prompt KV\nMiB", "RAM /\nN x prompt", "blocks", "shared\nblocks"]
    return Table("conversations sharing one system prompt (median over rounds)", headers, rows,
                 ["N x prompt KV: conversations x prompt tokens x KV bytes per token"])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", default="growth,shared")
    p.add_argument("--rounds", type=int, default=1,
                   help="bytes are deterministic: one round is enough; more for wall times")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--shared-conversations", type=int, default=100)
    p.add_argument("--shared-snapshot-conversations", type=int, default=10)
    p.add_argument("--shared-rules", type=int, default=40, help="sentences in the shared prompt")
    p.add_argument("--shared-max-tokens", type=int, default=1,
                   help="answer length in the shared part (what is kept is the prompt)")
    p.add_argument("--block-sizes", default="",
                   help="comma-separated block sizes to compare (default: the server's own)")
    p.add_argument("--no-snapshots", action="store_true", help="leave the snapshot server out")
    p.add_argument("--json-out", type=Path, default=LOG_DIR / "memory-blocks-latest.json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    set_block_sizes([int(x) for x in args.block_sizes.split(",") if x])
    if args.no_snapshots:
        del CONFIGS["snapshots"]
    out = run(args)
    tables = []
    if "growth" in args.parts:
        tables.append(growth_table(out["growth"]))
    if "shared" in args.parts:
        tables.append(shared_table(out["shared"]))
    for table in tables:
        print_table(table)
        if args.markdown:
            print(render_markdown(table))
    _dump(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
