"""Two real models, SmolLM2-135M-Instruct and Gemma 3 270M (a base model), each in its own
worker, serving requests at the same time; loading one does not stall the other."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from pensieve.config import default_data_dir
from pensieve.store.store import ModelStore
from tests.support.gemma_model import ensure_gemma
from tests.support.server import (
    MODEL,
    Server,
    assert_same_greedy_run,
    completion_entries,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.e2e

GEMMA = "gemma3:270m"  # a store name
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("two-models")
    ModelStore(tmp / "data" / "models").import_file(ensure_gemma(default_data_dir()), GEMMA,
                                                    link=True)
    server = start_server(tmp, "--parallel", "2", "--ctx-size", "2048", "--keep-alive", "-1",
                          data_dir=tmp / "data")
    yield server
    stop_server(server)


def _client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=180)


def _ps(server: Server) -> dict[str, dict]:
    rows = httpx.get(f"{server.base_url}/api/ps", timeout=10).json()["models"]
    return {m["name"]: m for m in rows}


def test_loading_a_model_does_not_stall_another(two_model_server: Server) -> None:
    client = _client(two_model_server)
    arrivals: list[float] = []
    first = threading.Event()

    def stream_smol() -> None:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=300, temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                first.set()

    smol = threading.Thread(target=stream_smol)
    smol.start()
    assert first.wait(60)
    sent = time.monotonic()
    gemma = client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=4, temperature=0)
    smol.join(120)
    assert gemma.choices[0].text
    load_seconds = _ps(two_model_server)[GEMMA]["load_seconds"]
    during_load = [t for t in arrivals if sent < t < sent + load_seconds]
    assert during_load, (load_seconds, len(arrivals))  # smol kept streaming while gemma loaded


def test_both_models_serve_concurrently(two_model_server: Server) -> None:
    client = _client(two_model_server)

    def complete(model: str) -> tuple[str, list]:
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                          temperature=0, logprobs=5)
        return reply.choices[0].text, completion_entries(reply.choices[0].logprobs)

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(complete, [MODEL, GEMMA, MODEL, GEMMA]))
    assert all(text for text, _ in runs)
    # each model is itself, greedy (batched or not: equal up to a near-tie)
    assert_same_greedy_run(runs[0][1], runs[2][1])
    assert_same_greedy_run(runs[1][1], runs[3][1])
    assert runs[0][0] != runs[1][0]  # and they are two different models
    rows = _ps(two_model_server)
    assert {MODEL, GEMMA} <= set(rows)
    assert rows[MODEL]["pid"] != rows[GEMMA]["pid"]
    for row in rows.values():
        assert row["load_seconds"] > 0 and row["resident_bytes"] > 50 << 20


def test_models_lists_both(two_model_server: Server) -> None:
    ids = {m.id for m in _client(two_model_server).models.list().data}
    assert {MODEL, GEMMA} <= ids
