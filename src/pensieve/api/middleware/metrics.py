"""Prometheus metrics, one registry per app (no module-level state), served at GET /metrics.

Counters and histograms are updated as things happen (requests by the request-context
middleware; tokens, TTFT, inter-token gaps and batch sizes by the engine clients, through the
`EngineObserver` hooks); gauges that describe the present (queue depth, resident models, memory
per tier) are read from the runtime at scrape time by a custom collector.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pensieve.runtime import ModelRuntime

log = logging.getLogger("pensieve.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True, slots=True)
class _ModelSeries:
    """One model's labelled children of the per-step and per-token metrics."""

    step_tokens: Any
    output_tokens: Any
    itl: Any


class Metrics:
    """The app's instruments. Also the `EngineObserver` its engine clients report to."""

    def __init__(self, runtime: ModelRuntime):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pensieve_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("pensieve_http_request_duration_seconds",
                                         "HTTP request duration (to the last byte).",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pensieve_time_to_first_token_seconds",
                              "Time from submission to the first generated token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pensieve_inter_token_seconds",
                             "Time between consecutive generated tokens of one choice.",
                             ["model"], buckets=_GAP_BUCKETS, registry=r)
        self.step_tokens = Histogram("pensieve_batch_tokens_per_step",
                                     "Tokens computed in one engine step (batch size).",
                                     ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pensieve_prompt_tokens", "Prompt tokens of finished "
                                     "and aborted requests.", ["model"], registry=r)
        self.output_tokens = Counter("pensieve_output_tokens", "Generated tokens.",
                                     ["model"], registry=r)
        self.rejected = Counter("pensieve_requests_rejected", "Generation requests refused "
                                "before running (queue full).", ["model", "reason"], registry=r)
        r.register(_RuntimeCollector(runtime))
        self._series: dict[str, _ModelSeries] = {}

    # --- EngineObserver --------------------------------------------------------------------
    # Called for every step and token: the labelled children are looked up once per model.
    def _per_model(self, model: str) -> _ModelSeries:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _ModelSeries(
                self.step_tokens.labels(model), self.output_tokens.labels(model),
                self.itl.labels(model))
        return series

    def on_step(self, model: str, num_batch_tokens: int) -> None:
        if num_batch_tokens > 0:
            self._per_model(model).step_tokens.observe(num_batch_tokens)

    def on_first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def on_tokens(self, model: str, num_tokens: int, gap_s: float | None) -> None:
        series = self._per_model(model)
        series.output_tokens.inc(num_tokens)
        if gap_s is not None and num_tokens > 0:
            per_token = gap_s / num_tokens
            for _ in range(num_tokens):
                series.itl.observe(per_token)

    def on_finish(self, model: str, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(num_prompt_tokens)

    def on_rejected(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()


class _RuntimeCollector(Collector):
    """Gauges read from the runtime at scrape time."""

    def __init__(self, runtime: ModelRuntime):
        self.runtime = runtime

    def describe(self) -> list[Metric]:
        return []  # the families depend on the models served; collected fresh each scrape

    def collect(self) -> Iterator[Metric]:
        labels = ["model"]
        running = GaugeMetricFamily("pensieve_sequences_running", "Sequences decoding.",
                                    labels=labels)
        waiting = GaugeMetricFamily("pensieve_queue_depth", "Requests waiting for a "
                                    "sequence slot in the worker.", labels=labels)
        in_flight = GaugeMetricFamily("pensieve_requests_in_flight", "Generation requests "
                                      "submitted and not finished.", labels=labels)
        loaded = GaugeMetricFamily("pensieve_model_loaded", "1 when the model's worker is "
                                   "running.", labels=labels)
        rss = GaugeMetricFamily("pensieve_worker_resident_bytes", "Resident memory of the "
                                "model's worker process.", labels=labels)
        size = GaugeMetricFamily("pensieve_model_file_bytes", "Size of the model file.",
                                 labels=labels)
        restarts = CounterMetricFamily("pensieve_worker_restarts", "Worker restarts after a "
                                       "crash.", labels=labels)
        hits = CounterMetricFamily("pensieve_memory_hits", "Requests served a prefix from "
                                   "memory, by tier.", labels=["model", "tier"])
        saved = CounterMetricFamily("pensieve_memory_tokens_saved", "Prompt tokens not "
                                    "recomputed thanks to memory, by tier.",
                                    labels=["model", "tier"])
        misses = CounterMetricFamily("pensieve_memory_misses", "Requests with no prefix in "
                                     "memory.", labels=labels)
        shared = {key: CounterMetricFamily(f"pensieve_memory_{key}", text, labels=labels)
                  for key, text in _SHARED_COUNTERS.items()}
        for served in self.runtime.models():
            name, client = served.name, served.client
            stats = client.stats
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            in_flight.add_metric([name], client.num_in_flight)
            loaded.add_metric([name], 1 if client.is_running else 0)
            rss.add_metric([name], _resident_bytes(client.pid) if client.is_running else 0)
            if client.info is not None:
                size.add_metric([name], client.info.size_bytes)
            restarts.add_metric([name], stats.num_restarts)
            memory = stats.memory or {}
            for tier, value in _by_tier(memory.get("hits")).items():
                hits.add_metric([name, tier], value)
            for tier, value in _by_tier(memory.get("tokens_saved")).items():
                saved.add_metric([name, tier], value)
            misses.add_metric([name], _count(memory.get("misses")))
            for key, family in shared.items():
                if key in memory:  # a shared tier is configured
                    family.add_metric([name], _count(memory[key]))
        yield from (running, waiting, in_flight, loaded, rss, size, restarts, hits, saved,
                    misses, *shared.values())


# The shared memory tier's counters (memory/shared.py), when a model has one.
_SHARED_COUNTERS = {
    "shared_hits": "Reads ahead from the shared memory tier that brought KV blocks.",
    "shared_misses": "Reads ahead from the shared memory tier that brought none (nothing "
                     "there, or the store unavailable).",
    "shared_errors": "Calls to the shared memory tier's store that failed.",
    "shared_bad_blobs": "Blobs from the shared memory tier refused by their checks, and "
                        "deleted.",
    "shared_bytes_written": "Bytes of KV blocks written to the shared memory tier.",
    "shared_bytes_read": "Bytes of KV blocks read from the shared memory tier.",
}


def _by_tier(value: object) -> dict[str, float]:
    """A `{tier: count}` of the worker's memory summary (absent until it sends one)."""
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _count(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _resident_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


router = APIRouter()


@router.get("/metrics", tags=["observability"])
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
