"""The serving workload fed straight into Pensieve's engine: no HTTP, no worker process.

Renders the same prompts as `serving.py` (same seed, chat template, sampling, closed loop of c
streams) and drives `Engine.step()` in this process, so the output tok/s is what the engine
itself gives that workload. Read it against `serving.py`'s Pensieve column to see what the HTTP
path costs, and against the ceiling column to see what the scheduler costs.

    .venv/bin/python bench/engine_only.py --concurrency 1,8,16
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    init_backend()
    settings = Settings(threads=args.threads)  # the server's defaults, memory tiers aside
    engine = Engine(settings.engine_config(str(args.model)))
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
    title = f"Pensieve engine alone: {args.model.name}, {args.threads} threads"
    print_table(
        Table(title, ["workload", "output tokens", "seconds", "steps", "out tok/s"], rows, [])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
