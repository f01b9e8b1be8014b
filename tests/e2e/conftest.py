"""Fixtures that run the real server on the real default model, driven by the real clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from pensieve.config import default_data_dir
from pensieve.store.default_model import ensure_default_model
from tests.support.server import MODEL, Server, start_server, stop_server
from tests.support.templates import NATIVE, create_model


@pytest.fixture(scope="session")
def default_model() -> Path:
    return ensure_default_model(default_data_dir())


@pytest.fixture(scope="session")
def server(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"), "--parallel", "8",
                       "--ctx-size", "8192")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                  timeout=120)


@pytest.fixture(scope="session")
def exact_server(default_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    """A server without memory (`--no-prefix-cache`), for tests that compare two greedy runs
    exactly (streamed and not, two APIs, a stop string against the full answer): each request
    is computed whole from an empty cache into the same cells, so one after another they are
    bit-identical. On `server` a repeated prompt reuses its KV and computes its last token alone
    in whatever cells are free, which moves logits by up to a few tenths of a nat and can flip
    a near-tie (docs/memory.md, "Determinism"). It serves the default model as itself (the
    generic tool convention) and under each native-style template as `<style>-tools`
    (tests/support/templates.py), for the agent tests of every family."""
    srv = start_server(tmp_path_factory.mktemp("exact"), "--no-prefix-cache", "--parallel", "4",
                       "--ctx-size", "8192")
    for style, template in NATIVE.items():
        create_model(srv.base_url, f"{style}-tools", MODEL, template)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def exact_client(exact_server: Server) -> OpenAI:
    return OpenAI(base_url=f"{exact_server.base_url}/v1", api_key="unused", max_retries=0,
                  timeout=120)
