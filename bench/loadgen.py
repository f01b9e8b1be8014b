"""Streaming load generator for OpenAI-compatible chat servers (loopback only).

In the manner of vLLM's benchmark_serving: `concurrency` workers each send one streaming
chat completion after another until `num_requests` have been sent; every request's TTFT,
inter-chunk gaps and end-to-end latency are recorded, then summarised per run.

    python bench/loadgen.py --base-url http://127.0.0.1:8080 --concurrency 8 --num-requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from workload import SamplingConfig, build_chat_body, select_prompts

log = logging.getLogger("bench.loadgen")

LOOPBACK_HOST = "127.0.0.1"
MAX_ERROR_CHARS = 300


class NotLoopback(ValueError):
    """Raised when asked to send load anywhere but 127.0.0.1."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Hard limits, so a stuck server can never hang the benchmark."""

    connect_s: float = 5.0
    request_s: float = 180.0
    run_s: float = 900.0


@dataclass(slots=True)
class RequestResult:
    """What one streamed request measured. Times are seconds from sending the request."""

    is_ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    num_usage_tokens: int | None = None
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens

    @property
    def num_output_tokens(self) -> int:
        """Tokens from the final usage chunk when the server sent one, else content chunks."""
        return self.num_usage_tokens if self.num_usage_tokens is not None else self.num_chunks

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.latency_s is None or self.num_output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One workload's aggregate figures; times in milliseconds."""

    concurrency: int
    num_requests: int
    num_ok: int
    num_failed: int
    num_short: int
    num_usage_reported: int
    wall_s: float
    total_output_tokens: int
    mean_output_tokens: float
    output_tok_s: float
    request_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    first_error: str | None
    mean_prompt_tokens: float | None = None  # from usage, when the server reports it
    mean_uncached_prompt_tokens: float | None = None  # prompt tokens it had to compute

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_loopback(base_url: str) -> str:
    """Return base_url without a trailing slash, or raise if it is not 127.0.0.1."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname != LOOPBACK_HOST:
        raise NotLoopback(f"only http://{LOOPBACK_HOST}:PORT is allowed, got {base_url!r}")
    return base_url.rstrip("/")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def make_client(concurrency: int, timeouts: Timeouts) -> httpx.AsyncClient:
    """An HTTP client that ignores proxy variables and never waits longer than the limits."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeouts.request_s, connect=timeouts.connect_s),
        limits=httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency),
        trust_env=False,
    )


@dataclass(slots=True)
class _Clock:
    """When the request was sent and when its latest content chunk arrived."""

    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for other lines (comments, pings, blanks)."""
    return line[len("data:") :].strip() if line.startswith("data:") else None


def _apply_chunk(result: RequestResult, chunk: dict[str, Any], clock: _Clock) -> None:
    """Fold one decoded SSE chunk into the request's result."""
    if "error" in chunk:
        raise RuntimeError(
            f"server error in stream: {json.dumps(chunk['error'])[:MAX_ERROR_CHARS]}"
        )
    usage = chunk.get("usage")
    if usage:
        result.num_usage_tokens = usage.get("completion_tokens")
        result.num_prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        result.num_cached_tokens = details.get("cached_tokens")
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if not content:
            continue
        now = time.perf_counter()
        if result.ttft_s is None:
            result.ttft_s = now - clock.start
        else:
            result.itls_s.append(now - clock.last)
        clock.last = now
        result.num_chunks += 1


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult
) -> None:
    clock = _Clock()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            raise RuntimeError(f"HTTP {response.status_code}: {text[:MAX_ERROR_CHARS]}")
        async for line in response.aiter_lines():
            payload = _sse_data(line)
            if payload == "[DONE]":
                break
            if payload:
                _apply_chunk(result, json.loads(payload), clock)
    result.latency_s = clock.elapsed()


async def send_request(
    client: httpx.AsyncClient, base_url: str, body: dict[str, Any], timeouts: Timeouts
) -> RequestResult:
    """Send one streaming chat completion; never raises, failures land in the result."""
    result = RequestResult()
    try:
        async with asyncio.timeout(timeouts.request_s):
            await _stream(client, f"{base_url}/v1/chat/completions", body, result)
        result.is_ok = result.ttft_s is not None
        if not result.is_ok:
            result.error = "stream carried no content"
    except (httpx.HTTPError, RuntimeError, ValueError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    return result


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id the server lists, or 'default' if it lists none."""
    try:
        response = await client.get(f"{base_url}/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
        return str(models[0]["id"]) if models else "default"
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return "default"


async def _worker(
    client: httpx.AsyncClient,
    base_url: str,
    bodies: list[dict[str, Any]],
    counter: Iterator[int],
    results: list[RequestResult | None],
    timeouts: Timeouts,
) -> None:
    for index in counter:
        if index >= len(bodies):
            return
        results[index] = await send_request(client, base_url, bodies[index], timeouts)


async def run_workload(
    base_url: str,
    concurrency: int,
    num_requests: int,
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    model: str | None = None,
    timeouts: Timeouts = Timeouts(),
) -> RunSummary:
    """Run one closed-loop workload and summarise it."""
    base_url = check_loopback(base_url)
    async with make_client(concurrency, timeouts) as client:
        model = model or await discover_model(client, base_url)
        prompts = select_prompts(num_requests, seed)
        bodies = [build_chat_body(p, model, sampling) for p in prompts]
        results: list[RequestResult | None] = [None] * num_requests
        counter = itertools.count()
        start = time.perf_counter()
        workers = [
            _worker(client, base_url, bodies, counter, results, timeouts)
            for _ in range(concurrency)
        ]
        try:
            async with asyncio.timeout(timeouts.run_s):
                await asyncio.gather(*workers)
        except TimeoutError:
            log.error("run exceeded %.0f s; unfinished requests count as failed", timeouts.run_s)
        wall_s = time.perf_counter() - start
    done = [r if r is not None else RequestResult(error="run timeout") for r in results]
    return summarize(done, concurrency, wall_s, sampling.max_tokens)


def summarize(
    results: list[RequestResult], concurrency: int, wall_s: float, max_tokens: int
) -> RunSummary:
    """Aggregate per-request measurements into one run's figures."""
    ok = [r for r in results if r.is_ok]
    total_tokens = sum(r.num_output_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itls_s]
    e2es = [r.latency_s for r in ok if r.latency_s is not None]
    errors = [r.error for r in results if r.error]
    return RunSummary(
        concurrency=concurrency,
        num_requests=len(results),
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        num_short=sum(1 for r in ok if r.num_output_tokens < max_tokens),
        num_usage_reported=sum(1 for r in ok if r.num_usage_tokens is not None),
        wall_s=wall_s,
        total_output_tokens=total_tokens,
        mean_output_tokens=total_tokens / len(ok) if ok else 0.0,
        output_tok_s=total_tokens / wall_s if wall_s > 0 else 0.0,
        request_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)),
        ttft_p99_ms=_ms(percentile(ttfts, 99)),
        tpot_p50_ms=_ms(percentile(tpots, 50)),
        tpot_p99_ms=_ms(percentile(tpots, 99)),
        itl_p50_ms=_ms(percentile(itls, 50)),
        itl_p99_ms=_ms(percentile(itls, 99)),
        e2e_p50_ms=_ms(percentile(e2es, 50)),
        e2e_p99_ms=_ms(percentile(e2es, 99)),
        first_error=errors[0] if errors else None,
        mean_prompt_tokens=_mean([r.num_prompt_tokens for r in ok]),
        mean_uncached_prompt_tokens=_mean(
            [
                r.num_prompt_tokens - (r.num_cached_tokens or 0)
                for r in ok
                if r.num_prompt_tokens is not None
            ]
        ),
    )


def _mean(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def format_summary(summary: RunSummary) -> str:
    """A few human-readable lines for one run."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    s = summary
    lines = [
        f"concurrency {s.concurrency}: {s.num_ok}/{s.num_requests} ok, {s.num_failed} failed, "
        f"{s.num_short} short, usage reported by {s.num_usage_reported}",
        f"  wall {s.wall_s:.2f} s, output {s.total_output_tokens} tok "
        f"(mean {s.mean_output_tokens:.1f}/req), {s.output_tok_s:.1f} tok/s, "
        f"{s.request_s:.2f} req/s",
        f"  TTFT p50/p99 {fmt(s.ttft_p50_ms)}/{fmt(s.ttft_p99_ms)} ms, "
        f"TPOT p50/p99 {fmt(s.tpot_p50_ms)}/{fmt(s.tpot_p99_ms)} ms, "
        f"ITL p50/p99 {fmt(s.itl_p50_ms)}/{fmt(s.itl_p99_ms)} ms, "
        f"E2E p50/p99 {fmt(s.e2e_p50_ms)}/{fmt(s.e2e_p99_ms)} ms",
    ]
    if s.first_error:
        lines.append(f"  first error: {s.first_error}")
    return "\n".join(lines)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by this script and the orchestrator."""
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="selects the prompts")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    parser.add_argument("--no-logit-bias", action="store_true", help="do not ban the EOS ids")
    parser.add_argument("--eos-ids", default="0,2", help="token ids banned by logit_bias")
    parser.add_argument("--request-timeout", type=float, default=180.0, help="seconds per request")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds per workload")


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    banned = () if args.no_logit_bias else tuple(int(t) for t in args.eos_ids.split(",") if t)
    return SamplingConfig(
        max_tokens=args.max_tokens, ignore_eos=not args.no_ignore_eos, banned_token_ids=banned
    )


def timeouts_from_args(args: argparse.Namespace) -> Timeouts:
    return Timeouts(request_s=args.request_timeout, run_s=args.run_timeout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument(
        "--model", default=None, help="model field; default: first id of /v1/models"
    )
    parser.add_argument("--json-out", default=None, help="write the summary as JSON here")
    add_workload_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        base_url = check_loopback(args.base_url)
    except NotLoopback as exc:
        log.error("%s", exc)
        return 2
    summary = asyncio.run(
        run_workload(
            base_url,
            args.concurrency,
            args.num_requests,
            sampling_from_args(args),
            seed=args.seed,
            model=args.model,
            timeouts=timeouts_from_args(args),
        )
    )
    print(format_summary(summary))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as out:
            json.dump(summary.to_dict(), out, indent=2)
    return 0 if summary.num_failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
