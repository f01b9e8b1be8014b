"""A long prompt arrives while other answers stream: how long do the streams stall?

S streams start together and generate (ignore_eos). Once all of them stream, one request with a
long, unique prompt (about N tokens) is sent. Measured, per server:

- the long request's time to first token (its prefill, shared with the running streams);
- the running streams' largest gap between two tokens, and their p99 gap, while that prompt
  was being computed (from its sending to its first token);
- the streams' output tok/s over that same window.

Servers, one after another on the same model and threads: llama-server, Pensieve with its
defaults, and Pensieve with `--prefill-chunk-while-decoding` at the step budget (512: a prompt
goes in as fast as possible, the streams wait). Median of `--rounds` alternating rounds.

    bench/.venv-lcp/bin/python bench/interference.py                  # 4 streams, ~1500 tokens
    bench/.venv-lcp/bin/python bench/interference.py --streams 8 --prompt-tokens 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from loadgen import check_loopback, discover_model, percentile
from report import Table, print_table, render_markdown
from servers import SERVERS, ServerProcess, ServerSpec, free_port
from serving import DEFAULT_MODEL, LOG_DIR, git_revision
from workload import PROMPTS, SamplingConfig, build_chat_body


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    spec: ServerSpec
    flags: tuple[str, ...] = ()


CONFIGS = {
    "llama-server": Config("llama-server", SERVERS["llama-server"]),
    "pensieve": Config("pensieve", SERVERS["pensieve"]),
    "pensieve-chunk512": Config("pensieve-chunk512", SERVERS["pensieve"],
                                ("--prefill-chunk-while-decoding", "512")),
}

# About 4.7 characters a token for this English filler with SmolLM2's tokenizer.
CHARS_PER_TOKEN = 4.7


@dataclass(slots=True)
class Stream:
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    error: str | None = None


@dataclass(slots=True)
class Round:
    ttft_s: float
    max_gap_s: float
    p99_gap_s: float
    tok_s: float
    prompt_tokens: int | None


def long_prompt(num_tokens: int, tag: str) -> str:
    words = " ".join(PROMPTS)
    text = ""
    while len(text) < num_tokens * CHARS_PER_TOKEN:
        text += words + " "
    return f"(Document {tag}.) {text[: int(num_tokens * CHARS_PER_TOKEN)]}\n\nSummarize it."


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], out: Stream,
                  usage: dict[str, Any] | None = None) -> None:
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if usage is not None and chunk.get("usage"):
                    usage.update(chunk["usage"])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    out.arrivals.append(time.perf_counter())
    except (httpx.HTTPError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"


async def one_round(base_url: str, args: argparse.Namespace, tag: str) -> Round:
    url = f"{base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5), trust_env=False,
                                 limits=httpx.Limits(max_connections=args.streams + 4)) as client:
        model = await discover_model(client, base_url)
        sampling = SamplingConfig(max_tokens=args.stream_tokens)
        streams = [Stream() for _ in range(args.streams)]
        tasks = [asyncio.create_task(_stream(
            client, url, build_chat_body(f"(Stream {tag}-{i}.) {PROMPTS[i % len(PROMPTS)]}",
                                         model, sampling), s)) for i, s in enumerate(streams)]
        while not all(len(s.arrivals) >= 8 for s in streams):
            if any(s.error for s in streams) or all(t.done() for t in tasks):
                raise RuntimeError(next((s.error for s in streams if s.error), "streams ended"))
            await asyncio.sleep(0.02)
        long_body = build_chat_body(long_prompt(args.prompt_tokens, tag), model,
                                    SamplingConfig(max_tokens=4))
        usage: dict[str, Any] = {}
        long = Stream()
        sent = time.perf_counter()
        await _stream(client, url, long_body, long, usage)
        if long.error or not long.arrivals:
            raise RuntimeError(f"long request failed: {long.error}")
        first = long.arrivals[0]
        if any(t.done() for t in tasks):
            raise RuntimeError("a stream ended before the long prompt was computed: "
                               "raise --stream-tokens")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps: list[float] = []
    num_tokens = 0
    for s in streams:
        inside = [t for t in s.arrivals if sent <= t <= first]
        before = [t for t in s.arrivals if t < sent]
        points = ([before[-1]] if before else []) + inside
        after = [t for t in s.arrivals if t > first]
        if after:
            points.append(after[0])  # the gap that spans the end of the prefill counts too
        gaps += [b - a for a, b in zip(points, points[1:], strict=False)]
        num_tokens += len(inside)
    window = first - sent
    return Round(window, max(gaps), percentile(gaps, 99) or 0.0, num_tokens / window,
                 usage.get("prompt_tokens"))


def run_server(config: Config, args: argparse.Namespace, round_no: int) -> Round:
    port = free_port()
    argv = config.spec.argv(model=args.model, port=port, threads=args.threads, parallel=8)
    argv += list(config.flags)
    with tempfile.TemporaryDirectory(prefix="pensieve-interference-") as data_dir:
        if config.spec.data_dir_flag:
            argv += [config.spec.data_dir_flag, data_dir]
        log_path = LOG_DIR / f"interference-{config.name}-{round_no}.log"
        base_url = check_loopback(f"http://127.0.0.1:{port}")
        with ServerProcess(argv, log_path, port, config.spec.ready_path) as server:
            server.wait_ready(180)
            return asyncio.run(one_round(base_url, args, f"{round_no}-{config.name}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(CONFIGS))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=1000,
                        help="max_tokens of each stream: enough to outlast the long prompt")
    parser.add_argument("--prompt-tokens", type=int, default=1500,
                        help="llama-server -np 8 gives each slot 2048 tokens of context")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.servers.split(",") if n]
    results: dict[str, list[Round]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(run_server(CONFIGS[name], args, r))
            last = results[name][-1]
            print(f"round {r + 1} {name}: TTFT {last.ttft_s * 1000:.0f} ms, max gap "
                  f"{last.max_gap_s * 1000:.0f} ms, p99 gap {last.p99_gap_s * 1000:.0f} ms, "
                  f"{last.tok_s:.1f} tok/s, prompt {last.prompt_tokens} tokens", flush=True)
    base = statistics.median(x.max_gap_s for x in results[names[0]]) if names else None
    rows = []
    for name in names:
        rs = results[name]
        ttft = statistics.median(x.ttft_s for x in rs)
        max_gap = statistics.median(x.max_gap_s for x in rs)
        rows.append([name, str(rs[0].prompt_tokens), f"{ttft * 1000:.0f}",
                     f"{max_gap * 1000:.0f}",
                     f"{statistics.median(x.p99_gap_s for x in rs) * 1000:.0f}",
                     f"{statistics.median(x.tok_s for x in rs):.1f}",
                     f"{max_gap / base:.2f}" if base else "-"])
    table = Table(
        f"a ~{args.prompt_tokens}-token prompt arrives while {args.streams} answers stream; "
        f"{args.model.name}, {args.threads} threads, median of {args.rounds} rounds, "
        f"git {git_revision()}",
        ["server", "long prompt tokens", "its TTFT ms", "streams' max gap ms",
         "streams' p99 gap ms", "streams' tok/s meanwhile", f"max gap / {names[0]}"],
        rows, [])
    print_table(table)
    if args.markdown:
        print(render_markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
