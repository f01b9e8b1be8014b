"""`pensieve cache`: look at and prune a running server's memory (its /admin/memory API)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from pensieve.cli.http import DEFAULT_URL, ApiClient, CliError


def add_cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = sub.add_parser("cache", help="List, inspect and delete remembered conversations")
    cache.add_argument("--url", default=None,
                       help=f"the server [env PENSIEVE_URL; default {DEFAULT_URL}]")
    cache.add_argument("--model", default=None, help="which served model (default: the first)")
    actions = cache.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every remembered prefix, largest first")
    actions.add_parser("show", help="one entry").add_argument("key")
    actions.add_parser("rm", help="forget one entry in every tier").add_argument("key")
    actions.add_parser("clear", help="forget everything")


def run_cache(args: argparse.Namespace, console: Console) -> int:
    key = getattr(args, "key", "")
    method, path = {"list": ("GET", ""), "show": ("GET", f"/{key}"),
                    "rm": ("DELETE", f"/{key}"), "clear": ("DELETE", "")}[args.action]
    params = {"model": args.model} if args.model else None
    try:
        with ApiClient.from_env(args.url, timeout=30) as client:
            body: dict[str, Any] = client.request(method, f"/admin/memory{path}", params)
    except CliError as exc:
        console.print(f"[red]Error:[/red] {exc}", highlight=False)
        return 1
    if args.action == "list":
        console.print(_table(body))
    else:
        console.print_json(json.dumps(body))
    return 0


def _table(body: dict[str, Any]) -> Table:
    st = body.get("stats") or {}
    caption = (f"{st.get('conversations', 0)} conversations in {st.get('blocks', 0)} blocks "
               f"({st.get('shared_blocks', 0)} shared); RAM {_mib(st.get('ram_bytes')) or 0} "
               f"MiB, disk {_mib(st.get('disk_bytes')) or 0} MiB") if "blocks" in st else None
    table = Table(title=f"memory of {body.get('model')}", caption=caption)
    table.add_column("key", no_wrap=True, min_width=32)
    for col in ("tokens", "tiers", "blocks (shared)", "RAM MiB", "disk MiB", "idle s"):
        table.add_column(col, justify="left" if col == "tiers" else "right")
    for e in body.get("entries", []):
        blocks = f"{e['blocks']} ({e['shared_blocks']})" if "blocks" in e else ""
        table.add_row(e["key"], str(e["num_tokens"]), ",".join(e["tiers"]), blocks,
                      _mib(e.get("ram_bytes")), _mib(e.get("disk_bytes")),
                      str(e.get("idle_s", "")))
    return table


def _mib(num_bytes: int | None) -> str:
    return f"{num_bytes / 2**20:.1f}" if num_bytes else ""
