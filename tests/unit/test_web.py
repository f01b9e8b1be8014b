"""The web routes without a model: the Ollama probe at `/`, the page for browsers, static files,
the offline API page, and no file that reaches beyond this server."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from fastapi.testclient import TestClient

from pensieve.api.app import create_app
from pensieve.runtime import ModelRuntime


@pytest.fixture
def http() -> TestClient:
    return TestClient(create_app(ModelRuntime()))  # no lifespan: no worker is started


def test_ollama_probe_gets_plain_text(http: TestClient) -> None:
    for accept in ("*/*", "application/json", ""):
        r = http.get("/", headers={"Accept": accept})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == "Ollama is running"
    assert http.head("/").status_code == 200


def test_browser_gets_the_chat_page(http: TestClient) -> None:
    r = http.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<select id="model"' in r.text and "/web/app.js" in r.text


@pytest.mark.parametrize("name,media", [("app.js", "text/javascript"),
                                        ("style.css", "text/css"),
                                        ("markdown.js", "text/javascript")])
def test_static_files(http: TestClient, name: str, media: str) -> None:
    r = http.get(f"/web/{name}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(media)


def test_unknown_static_file_is_a_404_in_openai_shape(http: TestClient) -> None:
    r = http.get("/web/__init__.py")
    assert r.status_code == 404
    assert "chat page is at /" in r.json()["error"]["message"]
    assert http.get("/web/..%2F..%2Fconfig.py").status_code == 404


def test_docs_page_is_offline_and_openapi_lists_the_api(http: TestClient) -> None:
    page = http.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1/chat/completions" in paths and "/" not in paths


def test_no_web_file_loads_anything_from_elsewhere() -> None:
    files = resources.files("pensieve.web")
    for entry in files.iterdir():
        if entry.name.endswith((".html", ".js", ".css")):
            text = entry.read_text(encoding="utf-8")
            assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), entry.name
            assert "@import" not in text and "url(http" not in text, entry.name
