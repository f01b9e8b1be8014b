"""`pensieve pull|import|list|show|rm|cp|ps`: the model store from the command line.

Everything but `ps` works on the store folder directly (no server needed); `ps` asks a running
server which models are loaded, since only it knows.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pensieve.cli.http import DEFAULT_URL, ApiClient, CliError
from pensieve.errors import InvalidRequest, PensieveError
from pensieve.store import describe
from pensieve.store.gguf import read_gguf
from pensieve.store.store import ModelDefaults, ModelStore

if TYPE_CHECKING:
    from pensieve.store.netguard import NetPolicy
    from pensieve.store.pull import PullProgress

COMMANDS = ("pull", "import", "list", "show", "rm", "cp", "ps")


def add_models_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store_flags = argparse.ArgumentParser(add_help=False)
    store_flags.add_argument("--data-dir", type=Path, default=None,
                             help="Pensieve's data folder [env PENSIEVE_DATA_DIR]")
    store_flags.add_argument("--models-dir", type=Path, default=None,
                             help="the model store [env PENSIEVE_MODELS_DIR; "
                                  "default DATA_DIR/models]")
    p = sub.add_parser("pull", parents=[store_flags], help="Download a model into the store")
    p.add_argument("source", help="hf.co/owner/repo[:QUANT], hf.co/owner/repo/file.gguf or "
                                  "an http(s) URL")
    p.add_argument("--name", default=None, help="store it under this name[:tag]")
    p.add_argument("--sha256", default=None, help="expected sha256 of the file")
    p.add_argument("--pull-allow", default=None, help="hosts or networks to allow besides "
                   "public addresses, comma-separated [env PENSIEVE_PULL_ALLOW; see "
                   "docs/security.md]")
    p = sub.add_parser("import", parents=[store_flags], help="Add a local GGUF file")
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True, help="name[:tag] to store it under")
    p.add_argument("--ctx-size", type=int, default=None, help="default context size")
    p.add_argument("--system", default=None, help="default system prompt")
    p.add_argument("--template", type=Path, default=None,
                   help="file with a Jinja chat template that overrides the GGUF's")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling default (temperature, top_p, top_k, min_p, "
                        "repeat_penalty, seed, stop, num_predict); repeatable")
    sub.add_parser("list", parents=[store_flags], help="List the models in the store")
    sub.add_parser("show", parents=[store_flags], help="Show a model's details") \
        .add_argument("model")
    sub.add_parser("rm", parents=[store_flags], help="Remove a model").add_argument("model")
    p = sub.add_parser("cp", parents=[store_flags], help="Copy a model under a new name")
    p.add_argument("source")
    p.add_argument("destination")
    sub.add_parser("ps", help="Models loaded in a running server").add_argument(
        "--url", default=None, help=f"the server [env PENSIEVE_URL; default {DEFAULT_URL}]")


def run_models(args: argparse.Namespace, console: Console) -> int:
    try:
        if args.command == "ps":
            return _ps(args, console)
        return _COMMANDS[args.command](_open_store(args), args, console)
    except PensieveError as exc:
        console.print(f"[red]Error:[/red] {exc.message}", highlight=False)
        return 1


def _open_store(args: argparse.Namespace) -> ModelStore:
    overrides = {k: v for k in ("data_dir", "models_dir")
                 if (v := getattr(args, k, None)) is not None}
    from pensieve.config import Settings, store_dir  # here: `ps` needs no settings

    return ModelStore(store_dir(Settings(**overrides)))


def _pull(store: ModelStore, args: argparse.Namespace, console: Console) -> int:
    from pensieve.store.pull import pull

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    policy = _pull_policy(args)
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def report(p: PullProgress) -> None:
            if p.total is None:
                console.print(p.status, highlight=False)
                return
            if p.status not in tasks:
                tasks[p.status] = bar.add_task(p.status, total=p.total)
            bar.update(tasks[p.status], completed=p.completed, total=p.total)

        manifest = pull(store, args.source, name=args.name, sha256=args.sha256,
                        progress=report, policy=policy)
    console.print(f"pulled [cyan]{manifest.name}[/cyan] (sha256:{manifest.digest[:12]})")
    return 0


def _pull_policy(args: argparse.Namespace) -> NetPolicy:
    """pull_allow from --pull-allow, else PENSIEVE_PULL_ALLOW, else the PENSIEVE_CONFIG file."""
    from pydantic import ValidationError

    from pensieve.config import load_settings

    overrides = {"pull_allow": args.pull_allow} if args.pull_allow is not None else {}
    try:
        return load_settings(overrides).pull_policy()
    except (ValidationError, FileNotFoundError) as exc:
        raise InvalidRequest(f"Invalid configuration: {exc}") from None


def _import(store: ModelStore, args: argparse.Namespace, console: Console) -> int:
    values: dict[str, object] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            console.print(f"[red]Error:[/red] --param wants KEY=VALUE, not {item!r}")
            return 2
        values[key] = _param_value(value)
    if args.ctx_size is not None:
        values["num_ctx"] = args.ctx_size
    if args.system is not None:
        values["system"] = args.system
    if args.template is not None:
        values["template"] = args.template.read_text()
    defaults = ModelDefaults.from_dict(values)
    manifest = store.import_file(args.file, args.name, defaults=defaults)
    console.print(f"imported [cyan]{manifest.name}[/cyan] (sha256:{manifest.digest[:12]})")
    return 0


def _param_value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _list(store: ModelStore, args: argparse.Namespace, console: Console) -> int:
    table = Table("NAME", "ID", "SIZE", "QUANT", "MODIFIED", box=None)
    for manifest in store.list():
        try:
            quant = read_gguf(store.blob_path(manifest.digest)).quantization
        except PensieveError:
            quant = "[red]broken[/red]"
        modified = datetime.fromtimestamp(manifest.created).strftime("%Y-%m-%d %H:%M")
        table.add_row(str(manifest.name), manifest.digest[:12], _size(manifest.size), quant,
                      modified)
    console.print(table)
    return 0


def _show(store: ModelStore, args: argparse.Namespace, console: Console) -> int:
    manifest = store.get(args.model)
    info = read_gguf(store.blob_path(manifest.digest))
    table = Table(box=None, show_header=False)
    for key, value in describe.summary(info).items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(f"[bold]{manifest.name}[/bold]  sha256:{manifest.digest}")
    console.print(table)
    defaults = describe.model_defaults(manifest, info)
    if defaults.to_dict():
        console.print("[bold]defaults[/bold]")
        console.print_json(json.dumps(defaults.to_dict()))
    template = manifest.defaults.template or info.chat_template
    console.print("[bold]template[/bold]", "(override)" if manifest.defaults.template else "")
    console.print(template or "(none: ChatML is used)", highlight=False, markup=False)
    return 0


def _rm(store: ModelStore, args: argparse.Namespace, console: Console) -> int:
    console.print(f"deleted {store.remove(args.model).name}")
    return 0


def _cp(store: ModelStore, args: argparse.Namespace, console: Console) -> int:
    copied = store.copy(args.source, args.destination)
    console.print(f"copied {args.source} to {copied.name}")
    return 0


def _ps(args: argparse.Namespace, console: Console) -> int:
    try:
        with ApiClient.from_env(args.url, timeout=10) as client:
            body: dict[str, Any] = client.get("/api/ps")
    except CliError as exc:
        console.print(f"[red]Error:[/red] {exc}", highlight=False)
        return 1
    table = Table("NAME", "PID", "BUDGET", "RESIDENT", "LOAD TIME", "CONTEXT", "UNTIL",
                  box=None)
    for m in body.get("models", []):
        table.add_row(m["name"], str(m.get("pid")), _size(m.get("size")),
                      _size(m.get("resident_bytes")), _seconds(m.get("load_seconds")),
                      str(m.get("context_length")), _until(m.get("expires_at", "")))
    console.print(table)
    return 0


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    return f"{num_bytes / 2**20:.0f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:.1f} GiB"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _until(expires_at: str) -> str:
    if not expires_at or expires_at.startswith("0001"):
        return "forever"
    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return expires_at
    return f"{max(0.0, when - time.time()):.0f} s"


_COMMANDS = {"pull": _pull, "import": _import, "list": _list, "show": _show, "rm": _rm,
             "cp": _cp}
