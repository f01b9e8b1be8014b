"""The start-up banner of `pensieve serve` says where it listens and how to connect."""

from __future__ import annotations

import json
import re

from pensieve.cli.serve import banner_text
from pensieve.config import Settings


def test_banner_names_the_model_and_every_way_to_connect() -> None:
    text = banner_text(Settings(port=9123), "my-model")
    assert "serving [cyan]my-model[/cyan] on http://127.0.0.1:9123" in text
    for line in ("browser   http://127.0.0.1:9123/",
                 "terminal  pensieve run my-model --url http://127.0.0.1:9123",
                 'OpenAI(base_url="http://127.0.0.1:9123/v1"',
                 "OLLAMA_HOST=http://127.0.0.1:9123 ollama run my-model",
                 "API       http://127.0.0.1:9123/docs"):
        assert line in text
    body = re.search(r"-d '(.*)'", text)
    assert body and json.loads(body.group(1))["model"] == "my-model"  # the curl line is valid


def test_banner_on_all_interfaces_connects_through_loopback() -> None:
    text = banner_text(Settings(host="0.0.0.0", port=8080), "m")
    assert "on http://0.0.0.0:8080" in text
    assert "browser   http://127.0.0.1:8080/" in text
