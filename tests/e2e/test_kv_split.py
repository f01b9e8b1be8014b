"""The server with a per-sequence KV split (--no-kv-unified): prefix reuse and n > 1 copy KV
across llama.cpp's streams, which only supports whole-buffer copies."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.server import MODEL, Server, assert_same_greedy_run, start_server, stop_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def split_server(default_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("split"), "--no-kv-unified", "--parallel", "4",
                       "--ctx-size", "4096")
    yield srv
    stop_server(srv)


def test_shared_prefixes_and_n_work_on_a_split_cache(split_server: Server) -> None:
    client = OpenAI(base_url=f"{split_server.base_url}/v1", api_key="x", max_retries=0)
    system = {"role": "system", "content": "You answer questions about geography briefly."}

    def ask(q: str) -> tuple[list, int]:
        r = client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": q}], max_tokens=12,
            temperature=0, logprobs=True, top_logprobs=5)
        return r.choices[0].logprobs.content, r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(ask, ["Where is Peru?", "Where is Chad?", "Where is Laos?"]))
    again = ask("Where is Peru?")
    assert again[1] > 0
    # alone and from reused KV against batched with two others: equal up to a near-tie
    assert_same_greedy_run(again[0], answers[0][0])
    r = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user",
                                       "content": "Name a river."}], n=3, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=5)
    for choice in r.choices[1:]:  # side by side in their own streams: equal up to a near-tie
        assert_same_greedy_run(r.choices[0].logprobs.content, choice.logprobs.content)
    assert split_server.model_status()["num_restarts"] == 0
