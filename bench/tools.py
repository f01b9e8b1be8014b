"""Agent workloads: a tool call's round trip, and what a lazy tool grammar costs in decode.

- roundtrip: N conversations, each as an agent runs it: the user's question with a tool
  offered (`tool_choice: required`, so the model calls it), then the call and its result sent
  back with the whole history (`tool_choice: auto`, streamed). Measured: time to first token
  of the follow-up (the round trip a user waits for after the tool returns), on Pensieve with
  its memory (the defaults), Pensieve with `--no-prefix-cache`, and llama-server (`--jinja`,
  its prompt cache on).
- decode: the same prompts streamed on Pensieve as free text, with a tool offered under
  `auto` in a native template (a lazy grammar: text stays free until a call opens), and with
  a tool under `auto` in the generic convention (a grammar from the first token). Measured:
  decode tokens per second of each reply (after its first token).

Every server runs once per round, in alternating order; the table gives medians over rounds.

    .venv/bin/python bench/tools.py --rounds 3 --markdown
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from servers import REPO_DIR, SERVERS, ServerProcess, free_port
from serving import DEFAULT_MODEL, LOG_DIR, git_revision

sys.path.insert(0, str(REPO_DIR))
from tests.support.templates import HERMES, WEATHER  # noqa: E402  (the bench's own template)

log = logging.getLogger("bench.tools")

SYSTEM = ("You are a travel assistant. Use the tools when they help. Be brief and friendly. "
          "Answer in English, and state temperatures in degrees Celsius. ") * 6
CITIES = ("Paris", "Oslo", "Lima", "Kyiv", "Rome", "Quito", "Hanoi", "Perth", "Cairo", "Dakar")
TOOLS = [{"type": "function", "function": WEATHER}]
CONFIGS = {
    "pensieve": ("pensieve", ()),
    "pensieve-nomem": ("pensieve", ("--no-prefix-cache",)),
    "llama-server": ("llama-server", ("--jinja",)),
}
NATIVE_MODEL = "hermes-bench"


def _server(config: str, model: Path, threads: int, data_dir: Path) -> ServerProcess:
    kind, flags = CONFIGS[config]
    spec = SERVERS[kind]
    port = free_port()
    argv = spec.argv(model=model, port=port, threads=threads, parallel=4) + list(flags)
    if spec.data_dir_flag:
        argv += [spec.data_dir_flag, str(data_dir)]
    return ServerProcess(argv, LOG_DIR / f"tools-{config}.log", port, spec.ready_path)


def _model_name(client: httpx.Client) -> str:
    return str(client.get("/v1/models").json()["data"][0]["id"])


def _stream(client: httpx.Client, body: dict[str, Any]) -> tuple[float, float, int]:
    """(TTFT s, decode tok/s after the first token, output tokens) of one streamed reply."""
    start = time.perf_counter()
    first = last = None
    pieces = 0
    usage_tokens = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") or delta.get("tool_calls") or \
                    delta.get("reasoning_content"):
                now = time.perf_counter()
                first = first or now
                last = now
                pieces += 1
    tokens = usage_tokens or pieces
    ttft = (first or time.perf_counter()) - start
    rate = (tokens - 1) / (last - first) if first and last and last > first else 0.0
    return ttft, rate, tokens


def roundtrip(client: httpx.Client, model: str, n: int) -> tuple[list[float], int]:
    """Follow-up TTFTs (s) of n tool round trips, and how many first turns were a call (a
    server that answers in text instead gets the call written for it, so the follow-up still
    has the same shape)."""
    out, calls = [], 0
    for i, city in enumerate(CITIES[:n]):
        ask = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": f"What is the weather in {city} right now?"}]
        r = client.post("/v1/chat/completions", json={
            "model": model, "messages": ask, "tools": TOOLS, "tool_choice": "required",
            "temperature": 0, "max_tokens": 120})
        r.raise_for_status()
        made = r.json()["choices"][0]["message"].get("tool_calls") or []
        calls += bool(made)
        call = made[0] if made else {
            "id": f"call{i:06d}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        history = [*ask, {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"],
                    "content": json.dumps({"city": city, "temp_c": 18, "sky": "clear"})}]
        ttft, _, _ = _stream(client, {"model": model, "messages": history, "tools": TOOLS,
                                      "tool_choice": "auto", "temperature": 0,
                                      "max_tokens": 32})
        out.append(ttft)
    return out, calls


def decode(client: httpx.Client, model: str, n: int) -> dict[str, list[float]]:
    """Decode tok/s of free text, a lazy tool grammar (native template) and the generic
    convention's grammar, on the same questions."""
    client.post("/api/create", json={"model": NATIVE_MODEL, "from": model,
                                     "template": HERMES, "stream": False}).raise_for_status()
    rates: dict[str, list[float]] = {"free": [], "lazy": [], "generic": []}
    for city in CITIES[:n]:
        msgs = [{"role": "user", "content": f"Tell me about a day trip from {city}."}]
        base = {"messages": msgs, "temperature": 0, "max_tokens": 96}
        for kind, extra in (("free", {"model": NATIVE_MODEL}),
                            ("lazy", {"model": NATIVE_MODEL, "tools": TOOLS,
                                      "tool_choice": "auto"}),
                            ("generic", {"model": model, "tools": TOOLS,
                                         "tool_choice": "auto"})):
            _, rate, tokens = _stream(client, {**base, **extra})
            if tokens > 8:
                rates[kind].append(rate)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--servers", default=",".join(CONFIGS))
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    servers = [s for s in args.servers.split(",") if s]
    ttfts: dict[str, list[float]] = {s: [] for s in servers}
    rates: dict[str, list[float]] = {"free": [], "lazy": [], "generic": []}
    calls: dict[str, int] = {}
    for k in range(args.rounds):
        order = servers if k % 2 == 0 else servers[::-1]
        for name in order:
            with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp, \
                    _server(name, args.model, args.threads, Path(tmp)) as srv:
                srv.wait_ready(180)
                with httpx.Client(base_url=srv.base_url, timeout=300, trust_env=False) as c:
                    model = _model_name(c)
                    follow_ups, made = roundtrip(c, model, args.conversations)
                    ttfts[name].append(statistics.median(follow_ups))
                    calls[name] = calls.get(name, 0) + made
                    if name == "pensieve":
                        for kind, values in decode(c, model, args.conversations).items():
                            rates[kind].append(statistics.median(values))
            log.info("round %d %s: follow-up TTFT %.0f ms", k + 1, name, ttfts[name][-1] * 1e3)
    rows = [("follow-up TTFT after a tool call, ms (median)",
             {s: f"{statistics.median(v) * 1e3:.0f}" for s, v in ttfts.items() if v}),
            ("first turns answered with a call",
             {s: f"{calls.get(s, 0)}/{args.rounds * args.conversations}" for s in servers})]
    if rates["free"]:
        rows.append(("Pensieve decode tok/s: free / lazy grammar / generic grammar",
                     {"pensieve": " / ".join(f"{statistics.median(rates[k]):.1f}"
                                             for k in ("free", "lazy", "generic"))}))
    print(f"git {git_revision()}, {args.rounds} rounds, {args.conversations} conversations")
    for title, values in rows:
        print(title)
        for server, value in values.items():
            print(f"  {server}: {value}")
    if args.markdown:
        print("\n| measure | " + " | ".join(servers) + " |")
        print("|---|" + "---|" * len(servers))
        for title, values in rows:
            print(f"| {title} | " + " | ".join(values.get(s, "") for s in servers) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
