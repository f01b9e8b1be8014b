"""The configuration reference (docs/configuration.md), generated from `Settings`: every field's
flag, environment variable, TOML key, default and description. Regenerate with `make docs`
(`python -m pensieve.cli.config_docs docs/configuration.md`); a unit test fails when it is
stale."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from pensieve.config import Settings

# Defaults computed on the machine at start-up, described instead of printed.
COMPUTED_DEFAULTS = {
    "data_dir": "`$XDG_DATA_HOME/pensieve`, else `~/.local/share/pensieve`",
    "threads": "the number of CPU cores",
}

HEADER = """\
# Configuration reference

Generated from `pensieve.config.Settings` by `make docs`; do not edit by hand.

Every setting of `pensieve serve` can be given three ways. Flags beat environment variables,
which beat the config file, which beats the default:

- a flag: `pensieve serve --ctx-size 8192`
- an environment variable: `PENSIEVE_CTX_SIZE=8192 pensieve serve`
- a key of a TOML file given by `--config FILE` (or `PENSIEVE_CONFIG=FILE`):

```toml
# pensieve.toml
port = 9000
ctx_size = 8192
prefix_cache = true
```

Boolean settings have a `--no-` flag to turn them off; in the environment use `true`/`false`.

## `pensieve serve`

| key (TOML) | flag | environment | default | description |
|---|---|---|---|---|
"""

FOOTER = """
## `pensieve run` and other clients

`pensieve run` and `pensieve cache` talk to a running server; these variables tell them where:

| environment | default | description |
|---|---|---|
| `PENSIEVE_URL` | `http://127.0.0.1:8080` | the server (`--url` beats it) |
| `PENSIEVE_API_KEY` | none | sent as `Authorization: Bearer ...` when the server needs a key |
| `PENSIEVE_HISTORY_FILE` | `<data dir>/run_history` | `pensieve run`'s input history |
"""


def render() -> str:
    rows = [_row(name, field) for name, field in Settings.model_fields.items()]
    return HEADER + "\n".join(rows) + "\n" + FOOTER


def _row(name: str, field: FieldInfo) -> str:
    flag = "--" + name.replace("_", "-")
    flags = f"`{flag}` / `--no-{flag[2:]}`" if field.annotation is bool else f"`{flag}`"
    description = (field.description or "").replace("|", "\\|") + _constraints(field)
    return (f"| `{name}` | {flags} | `PENSIEVE_{name.upper()}` | {_default(name, field)} | "
            f"{description} |")


def _default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        return COMPUTED_DEFAULTS.get(name, "computed at start-up")
    if field.default is None:
        return "none"
    value = str(field.default).lower() if isinstance(field.default, bool) else field.default
    return f"`{value}`"


def _constraints(field: FieldInfo) -> str:
    notes = []
    choices = _choices(field.annotation)
    if choices:
        notes.append("One of " + ", ".join(f"`{c}`" for c in choices) + ".")
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower(), None)
              for m in field.metadata}
    if "Ge" in bounds and "Le" in bounds:
        notes.append(f"From {bounds['Ge']} to {bounds['Le']}.")
    elif "Ge" in bounds:
        notes.append(f"At least {bounds['Ge']}.")
    elif "Le" in bounds:
        notes.append(f"At most {bounds['Le']}.")
    return (" " + " ".join(notes)) if notes else ""


def _choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the configuration reference.")
    parser.add_argument("output", type=Path, help="e.g. docs/configuration.md")
    args = parser.parse_args(argv)
    args.output.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
