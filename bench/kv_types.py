"""KV cache types compared in-process (no HTTP): what a quantized cache buys and costs.

For each type (`--types`, f16 first: it is the reference) the engine is built as `pensieve
serve` builds it, with `--cache-type-k/-v` set to that type, and measures:

- bytes per remembered token: RAM-tier snapshot bytes / tokens, over every conversation held
- conversations held by the same RAM and disk budgets (`--ram-mb`, `--disk-mb`): after
  `--conversations` distinct conversations (bench/multiturn.py's system prompt and questions,
  answers of `--answer-tokens`), how many each tier still holds
- decode tok/s: one stream, and `--streams` streams together, `--decode-tokens` each
- greedy drift against f16: `--prompts` fixed prompts, `--drift-tokens` greedy tokens each;
  how many outputs are identical, and |logprob(type) - logprob(f16)| of the chosen token at
  every position before the first divergence (mean and max, nats)

Rounds alternate the order of the types (`--rounds`); timings are medians over rounds, since
the box may be shared. Drift and bytes are deterministic and measured in the first round.

    PYTHONPATH=src .venv/bin/python bench/kv_types.py --types f16,q8_0,q4_0 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from multiturn import QUESTIONS, SYSTEM_PROMPT
from report import Table, print_table, render_markdown
from serving import DEFAULT_MODEL

from pensieve.config import Settings
from pensieve.engine.engine import Engine
from pensieve.engine.llama import init_backend
from pensieve.engine.types import EngineRequest, SamplingParams, SeqOutput, TokenLogprob
from pensieve.store.digest import file_digest
from pensieve.templates import ChatTemplate

Trace = list[TokenLogprob]


@dataclass(slots=True)
class Measured:
    bytes_per_token: float = 0.0
    ram_held: int = 0
    disk_held: int = 0
    decode_1: list[float] = field(default_factory=list)
    decode_n: list[float] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)


def make_engine(args: argparse.Namespace, kv: str, data_dir: Path) -> Engine:
    settings = Settings(threads=args.threads, parallel=8, ctx_size=8192, data_dir=data_dir,
                        cache_type_k=kv, cache_type_v=kv, memory_ram_mb=args.ram_mb,
                        memory_disk_mb=args.disk_mb, n_gpu_layers=0)
    digest = file_digest(args.model, data_dir / "digests.json")
    return Engine(settings.engine_config(str(args.model), digest))


def run_all(engine: Engine, requests: list[EngineRequest]) -> dict[str, list[SeqOutput]]:
    """Run requests to completion together; every output per request id."""
    outputs: dict[str, list[SeqOutput]] = {r.request_id: [] for r in requests}
    for req in requests:
        engine.add_request(req)
    pending = set(outputs)
    while pending:
        for out in engine.step():
            outputs[out.request_id].append(out)
            if out.finish_reason is not None:
                pending.discard(out.request_id)
    return outputs


def conversation(template: ChatTemplate, i: int) -> str:
    question = f"Ticket {i}: {QUESTIONS[i % len(QUESTIONS)]}"
    return template.render([{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": question}])


def measure_memory(engine: Engine, template: ChatTemplate, args: argparse.Namespace,
                   into: Measured) -> None:
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0.0, ignore_eos=True)
    for i in range(args.conversations):  # one at a time: each ends, so its KV is saved
        run_all(engine, [EngineRequest(f"conv-{i}", params, prompt=conversation(template, i))])
    entries = engine.memory_entries()
    ram = [e for e in entries if "ram" in e["tiers"]]  # type: ignore[operator]
    into.ram_held = len(ram)
    into.disk_held = sum("disk" in e["tiers"] for e in entries)  # type: ignore[operator]
    tokens = sum(int(e["num_tokens"]) for e in ram)  # type: ignore[call-overload]
    into.bytes_per_token = sum(int(e["ram_bytes"]) for e in ram) / max(tokens, 1)  # type: ignore[call-overload]


def measure_decode(engine: Engine, template: ChatTemplate, args: argparse.Namespace,
                   num_streams: int) -> float:
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    prompt = template.render([{"role": "user", "content": "Tell me a long story."}])
    requests = [EngineRequest(f"dec-{num_streams}-{i}-{time.monotonic_ns()}", params,
                              prompt=prompt, use_cache=False) for i in range(num_streams)]
    first: float | None = None
    num_tokens = 0
    for req in requests:
        engine.add_request(req)
    pending = {r.request_id for r in requests}
    while pending:
        outs = engine.step()
        if outs and first is None:
            first = time.perf_counter()  # decoding starts once every prompt is computed
            num_tokens -= len(outs)
        for out in outs:
            num_tokens += len(out.token_ids)
            if out.finish_reason is not None:
                pending.discard(out.request_id)
    assert first is not None
    return num_tokens / (time.perf_counter() - first)


def measure_traces(engine: Engine, template: ChatTemplate, args: argparse.Namespace) -> list[Trace]:
    params = SamplingParams(max_tokens=args.drift_tokens, temperature=0.0, logprobs=True,
                            top_logprobs=2, ignore_eos=True)
    traces = []
    for i, question in enumerate(QUESTIONS[: args.prompts]):  # one at a time: no batching
        prompt = template.render([{"role": "user", "content": question}])
        out = run_all(engine, [EngineRequest(f"drift-{i}", params, prompt=prompt,
                                             use_cache=False)])[f"drift-{i}"]
        traces.append([lp for o in out for lp in (o.logprobs or [])])
    return traces


def drift(ref: list[Trace], got: list[Trace]) -> tuple[int, float, float]:
    """(identical outputs, mean and max |logprob delta| before the first divergence)."""
    deltas: list[float] = []
    same = 0
    for a, b in zip(ref, got, strict=True):
        for x, y in zip(a, b, strict=True):
            if x.token_id != y.token_id:
                break
            deltas.append(abs(x.logprob - y.logprob))
        else:
            same += 1
    return same, statistics.fmean(deltas or [0.0]), max(deltas or [0.0])


def one_round(args: argparse.Namespace, kv: str, measured: Measured, first: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="pensieve-kv-") as tmp:
        engine = make_engine(args, kv, Path(tmp))
        try:
            info = engine.info()
            template = ChatTemplate.for_model(info.chat_template, info.bos_token,
                                              info.eos_token)
            if first:
                measured.traces = measure_traces(engine, template, args)
                measure_memory(engine, template, args, measured)
            measured.decode_1.append(measure_decode(engine, template, args, 1))
            measured.decode_n.append(measure_decode(engine, template, args, args.streams))
        finally:
            engine.close()


def table(args: argparse.Namespace, results: dict[str, Measured]) -> Table:
    ref = results[args.types[0]]
    rows = []
    for kv, m in results.items():
        same, mean_d, max_d = drift(ref.traces, m.traces)
        rows.append([
            kv, f"{m.bytes_per_token:.0f}", f"{m.bytes_per_token / ref.bytes_per_token:.2f}",
            f"{m.ram_held}", f"{m.disk_held}",
            f"{statistics.median(m.decode_1):.1f}", f"{statistics.median(m.decode_n):.1f}",
            f"{same}/{len(m.traces)}", f"{mean_d:.3f}", f"{max_d:.3f}",
        ])
    headers = ["KV type", "bytes/token", "vs f16", f"held in RAM ({args.ram_mb} MiB)",
               f"held on disk ({args.disk_mb} MiB)", "decode tok/s 1 stream",
               f"decode tok/s {args.streams} streams", "greedy outputs = f16",
               "|dlogprob| mean", "|dlogprob| max"]
    notes = [f"{args.model.name}, {args.threads} threads, {args.rounds} rounds (alternating "
             f"order, medians); {args.conversations} conversations of ~{args.answer_tokens} "
             f"answer tokens; drift over {args.prompts} prompts x {args.drift_tokens} tokens"]
    return Table("KV cache types", headers, rows, notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--types", default="f16,q8_0", help="comma-separated; the first is "
                        "the reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--ram-mb", type=int, default=64)
    parser.add_argument("--disk-mb", type=int, default=160)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--drift-tokens", type=int, default=32)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    args.types = args.types.split(",")
    init_backend()
    results = {kv: Measured() for kv in args.types}
    for r in range(args.rounds):
        order = args.types if r % 2 == 0 else list(reversed(args.types))
        for kv in order:
            one_round(args, kv, results[kv], first=r == 0)
            print(f"round {r + 1}: {kv} done", flush=True)
    result = table(args, results)
    print_table(result)
    if args.markdown:
        print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
