"""How often answers end in a loop ("A, A, A, ..." until max_tokens), per sampling setup.

30 everyday chat prompts x 2 seeds, up to 512 tokens each, against:

  pensieve server   Pensieve serving its embedded default model; the request sets nothing but
                    messages, max_tokens and seed, so the model's defaults decide
  pensieve web      the body the browser page (web/app.js) sends with its default settings
  llama-server      llama.cpp's server on the same GGUF, the request setting the same fields
  pensieve <name>   Pensieve with explicit sampling fields (--candidates; the old defaults are
                    `before-server` and `before-web`)

A reply *ends in a loop* when, after trailing white space is dropped, its tail is one unit of at
most `--max-unit` (20) characters repeated, covering at least `--min-span` (60) characters up to
the end: "A, A, A, A, ..." (unit "A, "), or "- memory\n- memory\n..." (unit "- memory\n").
Replies cut at max_tokens are counted separately (`cut`).

Run with the main venv (it has Pensieve and httpx); on a shared box, under the CPU lock:

    flock /tmp/pensieve-cpu.lock .venv/bin/python bench/loops.py [--concurrency 4] [--markdown]

llama-server comes from `bash bench/build_llama_server.sh`; it is skipped with a note when
missing. Servers run one after another (never two at once), each with `--concurrency` slots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import BENCH_DIR, HOST, ServerProcess, free_port  # noqa: E402

from pensieve.config import default_data_dir  # noqa: E402
from pensieve.store.default_model import FILE_NAME, ensure_default_model  # noqa: E402

PROMPTS = (
    "Write a haiku about memory, then a short list of three things to remember.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a rainbow is to a child.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What are the benefits of drinking water?",
    "Suggest a name for a small coffee shop.",
    "Write a short thank-you note to a friend who helped me move.",
    "What is photosynthesis?",
    "List five fruits that are rich in vitamin C.",
    "How can I stay focused while studying?",
    "Tell me a fun fact about octopuses.",
    "Write a two-sentence story about a lost cat.",
    "What should I pack for a weekend hiking trip?",
    "Explain the difference between weather and climate.",
    "Give me a simple recipe for pancakes.",
    "Why is the sky blue?",
    "Write a short birthday message for my grandmother.",
    "What are some good habits for saving money?",
    "Describe a sunset in three sentences.",
    "How does a bicycle work?",
    "What is the difference between a virus and a bacterium?",
    "Write a limerick about a dog who loves pizza.",
    "Give me three ideas for a rainy day at home.",
    "What is the tallest mountain in the world?",
    "How do I write a good email to my teacher?",
    "Summarize the water cycle in a few sentences.",
    "What are the primary colors?",
    "Write a short motivational quote about learning.",
)
SEEDS = (1, 2)
MAX_TOKENS = 512
LLAMA_SERVER = BENCH_DIR / ".build" / "cmake" / "bin" / "llama-server"

# What the browser page sends with its default settings (web/app.js buildBody; its max tokens
# are capped to the bench's here). Keep in step with web/index.html's defaults.
WEB_PAGE_FIELDS: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

CANDIDATES: dict[str, dict[str, Any]] = {
    # llama-server's default sampling (common/common.h: temp 0.8, top_k 40, top_p 0.95, min_p
    # 0.05, no penalties, DRY off; the same stages in the same order as Pensieve's chain), for
    # when the llama-server binary is not at hand: same distribution, another random stream.
    "llama-server-sampling": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                              "dry_multiplier": 0.0},
    # Pensieve's defaults before this bench: the OpenAI route's 1.0 with nothing else, and the
    # page's temperature 0.7.
    "before-web": {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                   "dry_multiplier": 0.0},
    "before-server": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                      "dry_multiplier": 0.0},
}


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    server: str  # "pensieve" or "llama-server"
    fields: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = SEEDS
    num_prompts: int | None = None  # the first N prompts; None: --num-prompts


@dataclass(slots=True)
class Reply:
    prompt: int
    seed: int
    text: str
    finish_reason: str
    num_tokens: int


def loop_span(text: str, max_unit: int = 20) -> tuple[int, int]:
    """The longest tail of `text` (trailing white space dropped) that repeats one unit of at
    most `max_unit` characters: (characters covered, unit length); (0, 0) when none repeats."""
    text = text.rstrip()
    best = (0, 0)
    for unit in range(1, max_unit + 1):
        i = len(text) - unit - 1
        while i >= 0 and text[i] == text[i + unit]:
            i -= 1
        span = len(text) - (i + 1)
        if span >= 2 * unit and span > best[0]:
            best = (span, unit)
    return best


def ends_in_loop(text: str, *, max_unit: int = 20, min_span: int = 60) -> bool:
    return loop_span(text, max_unit)[0] >= min_span


def chat_body(setup: Setup, model: str, prompt: str, seed: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS, "seed": seed}
    return {**body, **setup.fields}


def ask(client: httpx.Client, body: dict[str, Any]) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one chat request, streamed or not."""
    if not body.get("stream"):
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        choice = data["choices"][0]
        return (choice["message"]["content"] or "", choice["finish_reason"],
                data["usage"]["completion_tokens"])
    text, finish, num_tokens = [], "", 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                text.append(choice.get("delta", {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), finish, num_tokens


def run_setup(base_url: str, model: str, setup: Setup, args: argparse.Namespace,
              ) -> list[Reply]:
    jobs = [(p, s) for p in range(setup.num_prompts or args.num_prompts) for s in setup.seeds]

    def one(job: tuple[int, int]) -> Reply:
        prompt, seed = job
        body = chat_body(setup, model, PROMPTS[prompt], seed)
        try:
            text, finish, num_tokens = ask(client, body)
        except httpx.HTTPError as exc:
            print(f"{setup.name}: prompt {prompt} seed {seed} failed: {exc}", file=sys.stderr)
            return Reply(prompt, seed, "", "error", 0)
        return Reply(prompt, seed, text, finish, num_tokens)

    with httpx.Client(base_url=base_url, timeout=3600, trust_env=False) as client, \
            ThreadPoolExecutor(args.concurrency) as pool:
        return list(pool.map(one, jobs))


def summarise(setup: Setup, replies: list[Reply], seconds: float, args: argparse.Namespace,
              ) -> dict[str, Any]:
    failed = [r for r in replies if r.finish_reason == "error"]
    replies = [r for r in replies if r.finish_reason != "error"]
    looped = [r for r in replies if ends_in_loop(r.text, max_unit=args.max_unit,
                                                  min_span=args.min_span)]
    return {"setup": setup.name, "server": setup.server, "fields": setup.fields,
            "num_replies": len(replies), "num_failed": len(failed), "num_loops": len(looped),
            "loop_rate": len(looped) / max(1, len(replies)),
            "num_cut": sum(r.finish_reason == "length" for r in replies),
            "mean_tokens": sum(r.num_tokens for r in replies) / max(1, len(replies)),
            "seconds": seconds,
            "looped": [{"prompt": r.prompt, "seed": r.seed, "tail": r.text[-80:]}
                       for r in looped],
            "replies": [{"prompt": r.prompt, "seed": r.seed, "finish": r.finish_reason,
                         "tokens": r.num_tokens, "text": r.text} for r in replies]}


def serve_pensieve(model_file: Path, state: Path, port: int, args: argparse.Namespace,
                   ) -> ServerProcess:
    """Pensieve on its embedded default model (so the store entry's defaults apply), from a
    fresh data dir holding a link to the model file."""
    (state / "default").mkdir(parents=True)
    link = state / "default" / FILE_NAME
    try:
        os.link(model_file, link)
    except OSError:
        link.write_bytes(model_file.read_bytes())
    argv = [sys.executable, "-m", "pensieve.cli", "serve", "--host", HOST, "--port", str(port),
            "--data-dir", str(state), "--threads", str(args.threads),
            "--parallel", str(args.concurrency), "--ctx-size", str(2048 * args.concurrency),
            "--request-timeout", "3600"]
    return ServerProcess(argv, BENCH_DIR / ".logs" / "loops-pensieve.log", port, "/health")


def serve_llama(model_file: Path, port: int, args: argparse.Namespace) -> ServerProcess:
    threads, concurrency, extra = str(args.threads), args.concurrency, args.llama_args.split()
    argv = [str(LLAMA_SERVER), "-m", str(model_file),
            "-t", threads, "-tb", threads, "-np", str(concurrency), "-c", str(2048 * concurrency),
            "--host", HOST, "--port", str(port), *extra]
    return ServerProcess(argv, BENCH_DIR / ".logs" / "loops-llama-server.log", port, "/health")


def run_server(make: Callable[[int], ServerProcess], model: str, setups: list[Setup],
               args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    with make(free_port()) as server:
        server.wait_ready(600)
        for setup in setups:
            started = time.monotonic()
            replies = run_setup(server.base_url, model, setup, args)
            results.append(summarise(setup, replies, time.monotonic() - started, args))
            save(results, args)
            row = results[-1]
            print(f"{setup.name}: {row['num_loops']}/{row['num_replies']} loops, "
                  f"{row['num_cut']} cut, {row['num_failed']} failed, {row['seconds']:.0f} s",
                  file=sys.stderr)


def save(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "concurrency": args.concurrency, "max_unit": args.max_unit, "min_span": args.min_span,
        "max_tokens": MAX_TOKENS, "seeds": SEEDS, "num_prompts": args.num_prompts,
        "results": results}, indent=1))


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| setup | request fields beyond messages, max_tokens 512, seed | loops | loop rate "
             "| cut at max_tokens | mean tokens |", "|---|---|---|---|---|---|"]
    for row in results:
        fields = json.dumps({k: v for k, v in row["fields"].items()
                             if k not in ("stream", "stream_options")}) or "{}"
        lines.append(f"| {row['setup']} | `{fields}` | {row['num_loops']}/{row['num_replies']} "
                     f"| {100 * row['loop_rate']:.1f}% | {row['num_cut']} "
                     f"| {row['mean_tokens']:.0f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per server")
    ap.add_argument("--num-prompts", type=int, default=len(PROMPTS),
                    help="the first N prompts only (a quick look)")
    ap.add_argument("--max-unit", type=int, default=20)
    ap.add_argument("--min-span", type=int, default=60)
    ap.add_argument("--candidates", default="",
                    help="JSON {name: {field: value}} of extra Pensieve setups to try, or "
                         "'before' for Pensieve's defaults before this bench")
    ap.add_argument("--only-candidates", action="store_true",
                    help="only the --candidates setups on Pensieve")
    ap.add_argument("--first-question", type=int, default=0, metavar="N",
                    help="also ask the web page's first question with N seeds, as the page "
                         "sends it")
    ap.add_argument("--servers", default="llama-server,pensieve",
                    help="which servers, in this order")
    ap.add_argument("--llama-args", default="",
                    help="more llama-server flags (e.g. --no-repack where the CPU advertises "
                         "AMX that the machine cannot run)")
    ap.add_argument("--json-out", type=Path, default=BENCH_DIR / ".logs" / "loops-latest.json")
    ap.add_argument("--markdown", action="store_true")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    model_file = ensure_default_model(default_data_dir())
    model = "smollm2-135m-instruct"
    candidates = (CANDIDATES if args.candidates == "before"
                  else json.loads(args.candidates) if args.candidates else {})
    setups = [Setup(f"pensieve {name}", "pensieve", fields)
              for name, fields in candidates.items()]
    if not args.only_candidates:
        setups = [Setup("pensieve server", "pensieve"), *setups,
                  Setup("pensieve web", "pensieve", WEB_PAGE_FIELDS)]
    if args.first_question:
        # The page's first question exactly as the page sends it (its 2,048-token limit).
        setups.append(Setup("pensieve web, first question", "pensieve",
                            {**WEB_PAGE_FIELDS, "max_tokens": 2048},
                            seeds=tuple(range(1, args.first_question + 1)), num_prompts=1))
    results: list[dict[str, Any]] = []
    for server in args.servers.split(","):
        if server == "pensieve":
            with tempfile.TemporaryDirectory(prefix="bench-loops-") as state:
                run_server(lambda port, s=Path(state): serve_pensieve(
                    model_file, s / "data", port, args), model, setups, args, results)
        elif server == "llama-server" and LLAMA_SERVER.is_file():
            run_server(lambda port: serve_llama(model_file, port, args), model,
                       [Setup("llama-server", "llama-server")], args, results)
        else:
            print(f"{server}: not built or unknown (bash bench/build_llama_server.sh); "
                  "skipped", file=sys.stderr)
    print(markdown(results) if args.markdown else json.dumps(
        [{k: v for k, v in r.items() if k != "replies"} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
