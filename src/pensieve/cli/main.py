"""Command line: `pensieve serve`, `pensieve run`, `pensieve version`, `pensieve cache`. Flags of
`serve` are generated from `Settings`."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from rich.console import Console

from pensieve import __version__
from pensieve.cache_cli import add_cache_parser, run_cache
from pensieve.chat_cli import add_run_parser, parse_run_args, run_chat
from pensieve.config import Settings, load_settings
from pensieve.models_cli import COMMANDS as MODEL_COMMANDS
from pensieve.models_cli import add_models_parsers, run_models

console = Console(stderr=True)
log = logging.getLogger("pensieve")


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_kwargs(args[0])
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation)), "type": str}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, Path):
        return {"type": annotation}
    return {"type": str}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [env PENSIEVE_{name.upper()}; default {default}]"
        parser.add_argument(flag, dest=name, default=None, help=help_text,
                            **_flag_kwargs(field.annotation))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pensieve", description="Pensieve LLM server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a model over the OpenAI API")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML config file (keys are the flag names with underscores) "
                            "[env PENSIEVE_CONFIG]")
    add_settings_flags(serve)
    sub.add_parser("version", help="Print the version")
    add_cache_parser(sub)
    add_run_parser(sub)
    add_models_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # options may follow the prompt: parsed on their own, intermixed
        return run_chat(parse_run_args(argv[1:]), console)
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"pensieve {__version__}")
        return 0
    if args.command == "cache":
        return run_cache(args, Console())
    if args.command in MODEL_COMMANDS:
        return run_models(args, Console())
    overrides = {k: v for k, v in vars(args).items()
                 if k in Settings.model_fields and v is not None}
    try:
        settings = load_settings(overrides, args.config)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]Invalid configuration:[/red] {exc}\nEvery setting, its flag, "
                      "variable and allowed values: `pensieve serve --help` or "
                      "docs/configuration.md.", highlight=False)
        return 2
    from pensieve.server import serve  # imported late: keeps `pensieve version` fast

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
