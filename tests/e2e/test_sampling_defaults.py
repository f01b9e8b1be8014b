"""A model's sampling defaults through the real server: the embedded model's recommended
settings listed by /api/show and `pensieve show` and used when a request sets nothing; and
llama.cpp's DRY sampler accepted by every family, changing what a repetitive prompt gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pensieve.cli.main import main
from pensieve.store.default_model import RECOMMENDED_DEFAULTS
from tests.support.server import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.e2e

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
REPEATING = "red, blue, red, blue, red, blue, red, blue, red, blue,"
DRY = {"dry_multiplier": 2.0, "dry_base": 1.75, "dry_allowed_length": 2,
       "dry_penalty_last_n": -1}


@pytest.fixture(scope="module")
def embedded(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`pensieve serve` with no model: the embedded one, with its store entry. Without memory,
    so that two runs of one prompt compute the same logits (conftest.py, `exact_server`)."""
    srv = start_server(tmp_path_factory.mktemp("embedded"), "--parallel", "2",
                       "--ctx-size", "4096", "--no-prefix-cache", embedded=True)
    yield srv
    stop_server(srv)


def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.base_url}{path}", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_api_show_and_cli_show_list_the_embedded_models_defaults(
        embedded: Server, capsys: pytest.CaptureFixture[str]) -> None:
    expected = RECOMMENDED_DEFAULTS.to_dict()
    assert expected  # the embedded model has recommendations
    shown = _post(embedded, "/api/show", {"model": MODEL})
    lines = dict(line.split(None, 1) for line in shown["parameters"].splitlines())
    for key, value in expected.items():
        assert key in lines and float(lines[key]) == value, (key, shown["parameters"])
        assert f"PARAMETER {key}" in shown["modelfile"]
    models_dir = embedded.log_path.parent / "data" / "models"
    assert main(["show", MODEL, "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    for key, value in expected.items():
        assert f'"{key}": {value}' in out, (key, out)


def test_a_request_that_sets_nothing_samples_with_the_defaults(embedded: Server) -> None:
    def poem(**fields: Any) -> str:
        body = {"model": MODEL, "messages": POEM, "max_tokens": 48, "seed": 11, **fields}
        return _post(embedded, "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    plain = poem()
    assert plain == poem(**RECOMMENDED_DEFAULTS.to_dict())  # same seed, same settings
    assert plain != poem(temperature=1.0, top_p=1.0, dry_multiplier=0.0)  # the request wins


def _completion(server: Server, **fields: Any) -> str:
    body = {"model": MODEL, "prompt": REPEATING, "max_tokens": 32, "temperature": 0, **fields}
    return _post(server, "/v1/completions", body)["choices"][0]["text"]


def _distinct_items(text: str) -> int:
    return len({item.strip() for item in text.split(",") if item.strip()})


def test_dry_breaks_a_greedy_loop_on_openai(server: Server) -> None:
    plain = _completion(server)
    assert _distinct_items(plain) <= 3, plain  # the model alone repeats itself
    dry = _completion(server, **DRY)
    assert dry != plain
    assert _distinct_items(dry) > _distinct_items(plain), dry


def test_dry_is_accepted_and_used_in_ollama_options(server: Server) -> None:
    def generate(**options: Any) -> str:
        body = {"model": MODEL, "prompt": REPEATING, "raw": True, "stream": False,
                "options": {"temperature": 0, "num_predict": 24, **options}}
        return _post(server, "/api/generate", body)["response"]

    plain = generate()
    assert _distinct_items(plain) <= 3, plain
    assert generate(**DRY) != plain


def test_dry_is_accepted_and_used_on_anthropic(server: Server) -> None:
    def message(**fields: Any) -> str:
        body = {"model": MODEL, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "List colours."},
                             {"role": "assistant", "content": REPEATING}], **fields}
        return _post(server, "/v1/messages", body)["content"][0]["text"]

    plain = message()
    assert _distinct_items(plain) <= 3, plain  # the continued turn keeps repeating
    assert message(**DRY) != plain
