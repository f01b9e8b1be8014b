"""`pensieve run MODEL [PROMPT]`: chat in the terminal with a running server, or with a private
one started for this session when none answers.

Interactive when no prompt is given and stdin is a terminal; otherwise one answer, printed as
plain text (the prompt is the arguments, then whatever is piped in on stdin).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from pensieve.cli.http import DEFAULT_URL, AnswerStats, ApiClient, CliError, server_url
from pensieve.cli.local_server import LocalServer
from pensieve.cli.repl import ChatSession, Repl
from pensieve.store.default_model import DEFAULT_MODEL_NAME

LOAD_TIMEOUT_S = 300.0


RUN_DESCRIPTION = (
    "Chat with MODEL on the server at --url; when none answers there, start one for this "
    f"session. MODEL is a served model's name, a .gguf file, or {DEFAULT_MODEL_NAME!r} (the "
    "embedded default model).")


def add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", description=RUN_DESCRIPTION,
                         help="Chat with a model in the terminal (or answer one prompt)")
    _add_run_arguments(run)


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    """`pensieve run` arguments in any order (options may follow the prompt)."""
    parser = argparse.ArgumentParser(prog="pensieve run", description=RUN_DESCRIPTION)
    _add_run_arguments(parser)
    return parser.parse_intermixed_args(argv)


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL_NAME,
                     help=f"model name or .gguf path [default {DEFAULT_MODEL_NAME}]")
    run.add_argument("prompt", metavar="PROMPT", nargs="*",
                     help="answer this prompt and exit (stdin, when piped, is appended)")
    run.add_argument("--url", default=None,
                     help=f"the server [env PENSIEVE_URL; default {DEFAULT_URL}]")
    run.add_argument("--host", default=None, help="the server's host (instead of --url)")
    run.add_argument("--port", type=int, default=None, help="the server's port (with --host)")
    run.add_argument("--system", default=None, help="system prompt")
    run.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    run.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens")
    run.add_argument("--seed", type=int, default=None, help="sampling seed")
    run.add_argument("--verbose", action="store_true",
                     help="print the stats line after a one-shot answer (to stderr)")
    run.add_argument("--no-start", action="store_true",
                     help="fail instead of starting a server when none answers at --url")


@dataclass(slots=True)
class Connection:
    client: ApiClient
    model: str
    server: LocalServer | None = None

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()


def run_chat(args: argparse.Namespace, console: Console) -> int:
    prompt = _one_shot_prompt(args.prompt, sys.stdin)
    try:
        conn = connect(args, console)
    except CliError as exc:
        console.print(f"[red]Error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 1
    try:
        session = ChatSession(conn.model, args.system, _initial_params(args))
        if prompt is None:
            return Repl(conn.client, session, console).run()
        return answer_once(conn.client, session, prompt, console, verbose=args.verbose)
    finally:
        conn.close()


def _initial_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed}
    return {k: v for k, v in params.items() if v is not None}


def _one_shot_prompt(words: list[str], stdin: TextIO) -> str | None:
    parts = [" ".join(words)] if words else []
    if not stdin.isatty():
        piped = stdin.read().strip()
        if piped:
            parts.append(piped)
    return "\n\n".join(parts) if parts else None


def answer_once(client: ApiClient, session: ChatSession, prompt: str, console: Console,
                *, verbose: bool) -> int:
    stats = AnswerStats()
    text = ""
    try:
        for piece in client.stream_chat(session.request(prompt), stats):
            text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
    except CliError as exc:
        console.print(f"[red]Error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 1
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    if verbose:
        console.print(stats.line(), style="dim", highlight=False)
    return 0


# --- connecting --------------------------------------------------------------------------------
def connect(args: argparse.Namespace, console: Console) -> Connection:
    url = _server_url(args)
    client = ApiClient.from_env(url)
    if client.is_up():
        return Connection(client, _served_name(client, args.model, url))
    client.close()
    if args.no_start:
        raise CliError(f"no server answers at {url}. Start one with `pensieve serve`, or pass "
                       "--url.")
    name, serve_args = _serve_args_for(args.model, url)
    console.print(f"No server at {url}; starting one for {name}.", style="dim",
                  highlight=False, soft_wrap=True)
    server = LocalServer.start(serve_args)
    try:
        with console.status(f"Loading {name}..."):
            server.wait_ready(LOAD_TIMEOUT_S)
    except (CliError, KeyboardInterrupt):
        server.stop()
        raise
    return Connection(ApiClient(server.url), name, server)


def _server_url(args: argparse.Namespace) -> str:
    if args.url:
        url: str = args.url
        return url
    if args.host or args.port:
        return f"http://{args.host or '127.0.0.1'}:{args.port or 8080}"
    return server_url()


def _served_name(client: ApiClient, model: str, url: str) -> str:
    served = client.models()
    if model in served:
        return model
    path = Path(model).expanduser()
    if path.is_file():
        from pensieve.cli.serve import model_name_for  # late: only for file paths

        if model_name_for(path) in served:
            return model_name_for(path)
    listing = ", ".join(served) or "none"
    raise CliError(f"the server at {url} does not serve {model!r}; it serves: {listing}. "
                   "Name one of those, or point --url at a server that has it.")


def _serve_args_for(model: str, url: str) -> tuple[str, list[str]]:
    if model == DEFAULT_MODEL_NAME:
        return model, []
    path = Path(model).expanduser()
    if path.is_file():
        from pensieve.cli.serve import model_name_for

        return model_name_for(path), ["--model", str(path.resolve())]
    hint = (f" (The model comes first: `pensieve run {DEFAULT_MODEL_NAME} \"{model}\"`.)"
            if " " in model else "")
    raise CliError(f"no server answers at {url}, and {model!r} is neither a .gguf file nor "
                   f"the default model {DEFAULT_MODEL_NAME!r}. Give a .gguf path, start a "
                   f"server with `pensieve serve --model FILE`, or pass --url.{hint}")
