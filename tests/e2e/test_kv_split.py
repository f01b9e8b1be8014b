"""The server with a per-sequence KV split (--no-kv-unified): prefix reuse and n > 1 copy KV
across llama.cpp's streams, which only supports whole-buffer copies."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.server import MODEL, Server, start_server, stop_server

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

    def ask(q: str) -> tuple[str, int]:
        r = client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": q}], max_tokens=12,
            temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(ask, ["Where is Peru?", "Where is Chad?", "Where is Laos?"]))
    again = ask("Where is Peru?")
    assert again[0] == answers[0][0]
    assert again[1] > 0
    r = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user",
                                       "content": "Name a river."}], n=3, max_tokens=8,
                                       temperature=0)
    assert len({c.message.content for c in r.choices}) == 1
    assert split_server.model_status()["num_restarts"] == 0
