"""Command line: `pensieve serve|run|version|cache|pull|import|list|show|rm|cp|ps`. Flags of
`serve` are generated from `Settings`.

Light to import on purpose: a worker process spawned from `pensieve` (the console script) runs
the script again, and so imports this module; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pensieve import __version__

if TYPE_CHECKING:
    from pensieve.engine.worker import WorkerProcess

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
    from pensieve.config import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [env PENSIEVE_{name.upper()}; default {default}]"
        parser.add_argument(flag, dest=name, default=None, help=help_text,
                            **_flag_kwargs(field.annotation))


def build_parser(*, serve_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line; `serve`'s flags (generated from the settings, which import the
    engine) only when `serve_flags`, so other commands start quickly."""
    from pensieve.cli.cache import add_cache_parser
    from pensieve.cli.models import add_models_parsers
    from pensieve.cli.run import add_run_parser

    parser = argparse.ArgumentParser(prog="pensieve", description="Pensieve LLM server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a model over the OpenAI API")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML config file (keys are the flag names with underscores) "
                            "[env PENSIEVE_CONFIG]")
    if serve_flags:
        add_settings_flags(serve)
    sub.add_parser("version", help="Print the version")
    add_cache_parser(sub)
    add_run_parser(sub)
    add_models_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["version"]:  # without the parser, which imports the settings
        print(f"pensieve {__version__}")
        return 0
    if argv[:1] == ["run"]:  # options may follow the prompt: parsed on their own, intermixed
        from pensieve.cli.run import parse_run_args, run_chat

        return run_chat(parse_run_args(argv[1:]), _console(stderr=True))
    worker = _early_worker(argv)
    try:
        parser = build_parser(serve_flags=argv[:1] == ["serve"])
        return _dispatch(parser.parse_args(argv), worker)
    finally:
        if worker is not None:  # unused (a bad flag, a refused start), or already stopped
            worker.discard()


def _dispatch(args: argparse.Namespace, worker: WorkerProcess | None) -> int:
    if args.command == "version":
        print(f"pensieve {__version__}")
        return 0
    if args.command == "cache":
        from pensieve.cli.cache import run_cache

        return run_cache(args, _console())
    from pensieve.cli import models

    if args.command in models.COMMANDS:
        return models.run_models(args, _console())
    from pensieve.cli.serve import serve_command

    return serve_command(args, worker)


def _early_worker(argv: list[str]) -> WorkerProcess | None:
    """For `pensieve serve`, a model worker started before anything heavy is imported: it
    imports llama.cpp while this process imports the server, then loads the model as soon as
    `serve` knows which (`EngineClient.adopt`)."""
    if argv[:1] != ["serve"] or {"-h", "--help"} & set(argv) or _is_cluster(argv):
        return None
    from pensieve.engine.worker import spawn_worker

    return spawn_worker()


def _is_cluster(argv: list[str]) -> bool:
    """Cluster mode runs the engines in Ray replicas: no local worker to start early."""
    return bool(os.environ.get("PENSIEVE_CLUSTER")) or any(
        a == "--cluster" or a.startswith("--cluster=") for a in argv)


def _console(*, stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


if __name__ == "__main__":
    sys.exit(main())
