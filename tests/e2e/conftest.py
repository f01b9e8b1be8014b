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
def agent_server(default_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    """One server for the agent tests of every family, serving the default model as itself
    (the generic tool convention) and under each native-style template as `<style>-tools`
    (tests/support/templates.py)."""
    srv = start_server(tmp_path_factory.mktemp("agents"), "--parallel", "4",
                       "--ctx-size", "8192")
    for style, template in NATIVE.items():
        create_model(srv.base_url, f"{style}-tools", MODEL, template)
    yield srv
    stop_server(srv)

