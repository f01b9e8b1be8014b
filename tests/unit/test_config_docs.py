"""docs/configuration.md is generated from Settings and must not go stale."""

from __future__ import annotations

from pathlib import Path

from pensieve.cli.config_docs import render
from pensieve.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_checked_in_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run `make docs` and commit it")


def test_every_setting_has_its_flag_env_key_and_description() -> None:
    text = render()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description"
        flag = "--" + name.replace("_", "-")
        assert f"| `{name}` | `{flag}`" in text
        assert f"`PENSIEVE_{name.upper()}`" in text


def test_defaults_are_shown() -> None:
    text = render()
    assert "| `--port` | `PENSIEVE_PORT` | `8080` |" in text
    assert "`--prefix-cache` / `--no-prefix-cache` | `PENSIEVE_PREFIX_CACHE` | `true` |" in text
    assert "| `--model` | `PENSIEVE_MODEL` | none |" in text
    assert "One of `auto`, `on`, `off`." in text
