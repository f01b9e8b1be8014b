"""The interactive loop of `pensieve run`: read a message (`\"\"\"` opens a multi-line one), stream
the answer, print a stats line; slash commands change the session."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pensieve.cli.http import AnswerStats, ApiClient, CliError

PROMPT, CONTINUATION, FENCE = ">>> ", "... ", '"""'
SETTABLE = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "stop",
            "presence_penalty", "frequency_penalty", "repeat_penalty", "ignore_eos")
HELP = f"""Commands:
  /set                 show the parameters
  /set NAME VALUE      set a parameter: {", ".join(SETTABLE)}
  /unset NAME          back to the server's default
  /system [TEXT]       set (or show) the system prompt; an empty /system "" clears it
  /clear               forget the conversation (keeps the system prompt and parameters)
  /help                this text
  /bye                 leave (also Ctrl-D)
Start a message with {FENCE} to write several lines; end it with {FENCE}.
Ctrl-C stops an answer."""


@dataclass(slots=True)
class ChatSession:
    """What the next request carries: the conversation so far, the system prompt, parameters."""

    model: str
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)

    def request(self, user_text: str) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, *self.messages, {"role": "user", "content": user_text}]
        return {"model": self.model, "messages": messages, **self.params}


def parse_value(text: str) -> Any:
    """`/set` values: JSON when they parse (numbers, true, lists), else the plain string."""
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(text)
    return text


class Repl:
    def __init__(self, client: ApiClient, session: ChatSession, console: Console) -> None:
        self.client = client
        self.session = session
        self.console = console
        self.commands: dict[str, Callable[[str], bool]] = {
            "/set": self._set, "/unset": self._unset, "/system": self._system,
            "/clear": self._clear, "/help": self._help, "/?": self._help,
            "/bye": self._bye, "/exit": self._bye, "/quit": self._bye,
        }

    def run(self) -> int:
        history = _History.open()
        self.console.print(f"Chatting with [cyan]{self.session.model}[/cyan]. /help for "
                           "commands, /bye to leave.", highlight=False)
        try:
            while True:
                text = self._read_message()
                if text is None:
                    return 0
                if text.startswith("/"):
                    if not self._command(text):
                        return 0
                elif text.strip():
                    self._answer(text)
        finally:
            history.save()

    # --- input -------------------------------------------------------------------------------
    def _read_message(self) -> str | None:
        """The next message, or None at end of input (Ctrl-D)."""
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.console.print()
                return None
            except KeyboardInterrupt:
                self.console.print("\nUse /bye or Ctrl-D to leave.")
                continue
            if not line.lstrip().startswith(FENCE):
                return line.strip()
            with contextlib.suppress(KeyboardInterrupt):
                return self._read_block(line.lstrip()[len(FENCE):])
            self.console.print()

    def _read_block(self, first: str) -> str | None:
        if first.rstrip().endswith(FENCE):
            return first.rstrip()[: -len(FENCE)].strip()
        lines = [first] if first else []
        while True:
            try:
                line = input(CONTINUATION)
            except EOFError:
                return "\n".join(lines).strip()
            if line.rstrip().endswith(FENCE):
                lines.append(line.rstrip()[: -len(FENCE)])
                return "\n".join(lines).strip()
            lines.append(line)

    # --- answering ---------------------------------------------------------------------------
    def _answer(self, text: str) -> None:
        stats, answer = AnswerStats(), ""
        try:
            pieces = self.client.stream_chat(self.session.request(text), stats)
            try:
                for piece in pieces:
                    answer += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            finally:
                pieces.close()  # hang up now when stopped, so the server frees the sequence
        except KeyboardInterrupt:
            self.console.print("\n[yellow]stopped[/yellow] (not kept in the conversation)")
            return
        except CliError as exc:
            self.console.print(f"[red]Error:[/red] {exc}", highlight=False, soft_wrap=True)
            return
        self.session.messages += [{"role": "user", "content": text},
                                  {"role": "assistant", "content": answer}]
        sys.stdout.write("\n")
        self.console.print(stats.line(), style="dim", highlight=False)

    # --- commands (each returns False to leave) ----------------------------------------------
    def _command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        handler = self.commands.get(name)
        if handler is None:
            self.console.print(f"Unknown command {name}. /help lists the commands.")
            return True
        return handler(rest.strip())

    def _set(self, rest: str) -> bool:
        if not rest:
            shown = json.dumps(self.session.params) if self.session.params else "server defaults"
            self.console.print(f"parameters: {shown}", highlight=False)
            return True
        name, _, value = rest.partition(" ")
        if name not in SETTABLE or not value.strip():
            self.console.print(f"Usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}.")
            return True
        self.session.params[name] = parse_value(value.strip())
        self.console.print(f"Set {name} to {self.session.params[name]!r}.", highlight=False)
        return True

    def _unset(self, rest: str) -> bool:
        removed = self.session.params.pop(rest, None) is not None
        self.console.print(f"Unset {rest}." if removed else f"{rest or 'NAME'} is not set.")
        return True

    def _system(self, rest: str) -> bool:
        if not rest:
            self.console.print(f"system prompt: {self.session.system or '(none)'}",
                               highlight=False)
            return True
        self.session.system = None if rest in ('""', "''") else rest
        self.console.print("System prompt set." if self.session.system
                           else "System prompt cleared.")
        return True

    def _clear(self, _: str) -> bool:
        self.session.messages.clear()
        self.console.print("Conversation cleared.")
        return True

    def _help(self, _: str) -> bool:
        self.console.print(HELP, highlight=False, markup=False)
        return True

    def _bye(self, _: str) -> bool:
        return False


@dataclass(slots=True)
class _History:
    """readline's line editing and history, kept in a file between sessions (when available)."""

    path: Path | None

    @classmethod
    def open(cls) -> _History:
        try:
            import readline
        except ImportError:  # not on every platform; input() still works
            return cls(None)
        from pensieve.config import default_data_dir  # late: the settings import the engine

        path = Path(os.environ.get("PENSIEVE_HISTORY_FILE")
                    or default_data_dir() / "run_history")
        readline.set_history_length(1000)
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
        return cls(path)

    def save(self) -> None:
        if self.path is None:
            return
        import readline

        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self.path)
