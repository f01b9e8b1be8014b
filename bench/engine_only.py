"""The serving workload fed straight into Pensieve's engine: no HTTP, no worker process.

Renders the same prompts as `serving.py` (same seed, chat template, sampling, closed loop of c
streams) and drives `Engine.step()` in this process, so the output tok/s is what the engine
itself gives that workload. Read it against `serving.py`'s Pensieve column to see what the HTTP
path costs, and against the ceiling column to see what the scheduler costs.

    .venv/bin/python bench/engine_only.py --concurrency 1,8,16

`--retained N` first runs N unrelated conversations of `--retained-tokens` tokens each (one
answer token), as a server that has been in use holds their KV for follow-up turns; then the
workload. `--memory` gives the engine its RAM tier (in a temporary directory), as `pensieve
serve` has by default.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from report import Table, print_table
from serving import DEFAULT_MODEL, requests_for
from workload import SamplingConfig, select_prompts

from pensieve.config import Settings
from pensieve.engine.engine import Engine
from pensieve.engine.llama import init_backend
from pensieve.engine.types import EngineRequest, SamplingParams
from pensieve.templates import ChatTemplate


def run(
    engine: Engine,
    template: ChatTemplate,
    concurrency: int,
    num_requests: int,
    seed: int,
    sampling: SamplingConfig,
) -> tuple[int, float, int]:
    """Returns (output tokens, seconds, steps) for one closed-loop workload."""
    params = SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        ignore_eos=sampling.ignore_eos,
        logit_bias=tuple((t, -100.0) for t in sampling.banned_token_ids),
    )
    prompts = select_prompts(num_requests, seed)
    pending = list(enumerate(prompts))
    live = num_tokens = num_steps = 0
    started = time.perf_counter()
    while pending or live:
        while pending and live < concurrency:
            i, prompt = pending.pop(0)
            text = template.render([{"role": "user", "content": prompt}])
            engine.add_request(EngineRequest(f"{seed}-{i}", params, prompt=text))
            live += 1
        for out in engine.step():
            num_tokens += len(out.token_ids)
            live -= out.finish_reason is not None
        num_steps += 1
    return num_tokens, time.perf_counter() - started, num_steps


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--seed", type=int, default=42, help="as serving.py's --seed")
    parser.add_argument("--memory", action="store_true", help="with the RAM tier (no disk)")
    parser.add_argument("--retained", type=int, default=0, help="conversations held first")
    parser.add_argument("--retained-tokens", type=int, default=1000)
    args = parser.parse_args()
    init_backend()
    with tempfile.TemporaryDirectory(prefix="pensieve-engine-only-") as data_dir:
        # the server's defaults; memory tiers only with --memory (a digest names their entries)
        settings = Settings(threads=args.threads, data_dir=data_dir, memory_disk_mb=0)
        digest = "0" * 64 if args.memory else None
        engine = Engine(settings.engine_config(str(args.model), model_digest=digest))
        return measure(engine, args)


def hold_conversations(engine: Engine, count: int, num_tokens: int) -> None:
    """Run `count` unrelated prompts of `num_tokens` tokens to their one-token answers."""
    params = SamplingParams(max_tokens=1)
    for i in range(count):
        tokens = [100 + (i * 7919 + j * 31) % 30000 for j in range(num_tokens)]
        engine.add_request(EngineRequest(f"held-{i}", params, prompt_tokens=tokens))
        while engine.scheduler.has_work():
            engine.step()
    while engine.has_work():  # the idle steps that save to the memory tiers
        engine.step()


def measure(engine: Engine, args: argparse.Namespace) -> int:
    hold_conversations(engine, args.retained, args.retained_tokens)
    info = engine.info()
    template = ChatTemplate.for_model(info.chat_template, info.bos_token, info.eos_token)
    sampling = SamplingConfig()
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        tokens, seconds, steps = run(
            engine, template, c, requests_for(c, None), args.seed * 1000 + c, sampling
        )
        rows.append(
            [f"c={c}", str(tokens), f"{seconds:.2f}", str(steps), f"{tokens / seconds:.1f}"]
        )
    engine.close()
    title = (f"Pensieve engine alone: {args.model.name}, {args.threads} threads, memory tiers "
             f"{'on' if args.memory else 'off'}, {args.retained} x {args.retained_tokens} "
             "tokens held first")
    print_table(
        Table(title, ["workload", "output tokens", "seconds", "steps", "out tok/s"], rows, [])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
