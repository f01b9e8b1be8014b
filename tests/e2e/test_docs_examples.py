"""Every curl example of docs/api.md for the core server's routes runs against the real server
and succeeds (routes of other modules, marked in the page, and placeholders are left out)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.server import Server

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
DOC_URL = "http://127.0.0.1:8080"


def core_examples() -> list[str]:
    """curl commands from sh blocks and table rows, skipping other modules' routes and KEY/NAME."""
    examples, heading, block = [], "", None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = line
        elif line == "```sh":
            block = []
        elif line == "```" and block is not None:
            if "module)" not in heading:
                examples.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
        elif line.startswith("| `") and "module)" not in line:
            command = re.search(r"`(curl .*?)` \|$", line)
            examples += [command.group(1)] if command else []
    return [e for e in examples if "KEY" not in e and "NAME" not in e]


def test_there_are_core_examples() -> None:
    examples = core_examples()
    assert len(examples) >= 8
    assert any("/v1/chat/completions" in e for e in examples)
    assert not any("/api/" in e or "/v1/messages" in e for e in examples)


@pytest.mark.parametrize("example", core_examples())
def test_example_runs(server: Server, example: str) -> None:
    command = example.replace(DOC_URL, server.base_url).replace(
        "curl ", "curl -sS --fail-with-body --max-time 120 ")
    result = subprocess.run(["bash", "-ec", command], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
