"""`pensieve run` against the real server: one-shot output (arguments, piped stdin), errors that
say what to do, a private server started when none answers, and the interactive loop in a pty."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pexpect
import pytest
from openai import OpenAI

from pensieve.cli.http import AnswerStats
from pensieve.cli.http import ApiClient as ChatClient
from tests.support.server import (
    MODEL,
    Server,
    assert_text_follows_greedy_run,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.e2e

STATS = re.compile(r"(\d+) tokens · [\d.-]+ tok/s · (\d+) of (\d+) prompt tokens cached")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
GREEDY = {"temperature": 0, "max_tokens": 24}


def run_cli(*args: str, stdin: str = "", env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pensieve.cli", "run", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def api_run(client: OpenAI, messages: list[dict[str, str]]) -> list:
    """The API's greedy run of the same request, token by token with its near alternatives:
    the CLI's answer is checked against it with the documented near-tie tolerance, since the
    two computations may find different KV layouts (docs/memory.md, Determinism)."""
    resp = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=5,
                                          **GREEDY)  # type: ignore[arg-type]
    assert resp.choices[0].logprobs is not None
    return resp.choices[0].logprobs.content or []


def greedy_flags(url: str) -> list[str]:
    return ["--url", url, "--temperature", "0", "--max-tokens", "24"]


@pytest.mark.parametrize("args,stdin,prompt", [
    (["Name a fruit."], "", "Name a fruit."),
    ([], "Name a fruit.\n", "Name a fruit."),
    (["Translate to English:"], "bonjour\n", "Translate to English:\n\nbonjour"),
], ids=["argument", "stdin", "argument-and-stdin"])
def test_one_shot_prints_the_plain_answer(server: Server, client: OpenAI, args: list[str],
                                          stdin: str, prompt: str) -> None:
    out = run_cli(MODEL, *args, *greedy_flags(server.base_url), stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and out.stdout.endswith("\n")
    assert not out.stdout.endswith("\n\n")
    assert_text_follows_greedy_run(out.stdout, api_run(client, [{"role": "user",
                                                                 "content": prompt}]))
    assert "\x1b[" not in out.stdout and out.stderr == ""


def test_one_shot_system_prompt_and_verbose_stats(server: Server, client: OpenAI) -> None:
    out = run_cli(MODEL, "Name a fruit.", "--system", "Answer in French.", "--verbose",
                  *greedy_flags(server.base_url))
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and not out.stdout.endswith("\n\n")
    assert_text_follows_greedy_run(out.stdout, api_run(
        client, [{"role": "system", "content": "Answer in French."},
                 {"role": "user", "content": "Name a fruit."}]))
    assert STATS.search(out.stderr)


def test_errors_say_what_to_do(server: Server) -> None:
    out = run_cli("no-such-model", "hi", "--url", server.base_url)
    assert out.returncode == 1
    assert f"it serves: {MODEL}" in out.stderr and "--url" in out.stderr
    out = run_cli(MODEL, "hi", "--url", server.base_url, "--temperature", "-1")
    assert out.returncode == 1 and "temperature" in out.stderr and "HTTP 400" in out.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    out = run_cli(MODEL, "hi", "--url", nobody, "--no-start")
    assert out.returncode == 1 and "pensieve serve" in out.stderr
    out = run_cli("not-a-file.gguf", "hi", "--url", nobody)
    assert out.returncode == 1 and "neither a .gguf file" in out.stderr


def test_starts_a_private_server_when_none_answers(default_model: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = run_cli(str(default_model), "Name a fruit.", "--url", url, "--max-tokens", "8",
                  env={"PENSIEVE_DATA_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "starting one for smollm2-135m-instruct.q4_1" in out.stderr.lower()
    with pytest.raises(httpx.ConnectError):  # and stopped it again
        httpx.get(f"{url}/health", timeout=2)


class Chat:
    """`pensieve run` in a pseudo-terminal."""

    def __init__(self, url: str, history: Path) -> None:
        env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb",
               "PENSIEVE_HISTORY_FILE": str(history)}
        self.child = pexpect.spawn(sys.executable, ["-m", "pensieve.cli", "run", MODEL,
                                                    "--url", url], env=env, encoding="utf-8",
                                   timeout=120, dimensions=(50, 400))
        self.child.expect_exact(">>> ")

    def command(self, line: str, reply: str) -> None:
        self.child.sendline(line)
        self.child.expect_exact(reply)
        self.child.expect_exact(">>> ")

    def ask(self, *lines: str) -> tuple[str, re.Match[str]]:
        """Send a message (one line, or several); return the answer and its stats line."""
        for line in lines[:-1]:
            self.child.sendline(line)
            self.child.expect_exact("... ")
        self.child.sendline(lines[-1])
        self.child.expect(STATS)
        stats = self.child.match
        text = ANSI.sub("", self.child.before).replace("\r\n", "\n")
        self.child.expect_exact(">>> ")
        return text.split("\n", 1)[1].rstrip("\n"), stats  # drop the echoed input line


def test_interactive_chat(server: Server, client: OpenAI, tmp_path: Path) -> None:
    chat = Chat(server.base_url, tmp_path / "history")
    chat.command("/set temperature 0", "Set temperature to 0.")
    chat.command("/set max_tokens 24", "Set max_tokens to 24.")
    chat.command("/set", '"temperature": 0, "max_tokens": 24')
    chat.command("/set nonsense 1", "Usage: /set NAME VALUE")

    first = "Name a fruit.\nJust one."
    answer, stats = chat.ask('"""Name a fruit.', 'Just one."""')
    turn1 = [{"role": "user", "content": first}]
    assert_text_follows_greedy_run(answer, api_run(client, turn1))
    assert int(stats.group(1)) > 0

    history = [*turn1, {"role": "assistant", "content": answer},
               {"role": "user", "content": "And another?"}]
    answer, stats = chat.ask("And another?")
    assert_text_follows_greedy_run(answer, api_run(client, history))
    assert int(stats.group(2)) > 0  # the first turn came from memory

    chat.command("/clear", "Conversation cleared.")
    chat.command("/system Answer in French.", "System prompt set.")
    answer, _ = chat.ask("Name a fruit.")
    assert_text_follows_greedy_run(answer, api_run(
        client, [{"role": "system", "content": "Answer in French."},
                 {"role": "user", "content": "Name a fruit."}]))
    chat.command("/nope", "Unknown command /nope")
    chat.child.sendline("/bye")
    chat.child.expect(pexpect.EOF)
    chat.child.close()
    assert chat.child.exitstatus == 0
    assert "/set temperature 0" in (tmp_path / "history").read_text()


def test_ctrl_c_stops_an_answer_and_frees_the_sequence(server: Server, tmp_path: Path) -> None:
    chat = Chat(server.base_url, tmp_path / "history")
    chat.command("/set max_tokens 4000", "Set max_tokens to 4000.")
    chat.command("/set ignore_eos true", "Set ignore_eos to True.")
    chat.child.sendline("Tell me a very long story.")
    chat.child.expect_exact("Tell me a very long story.\r\n")  # the echo
    chat.child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
    assert server.model_status()["num_running"] == 1
    chat.child.sendcontrol("c")
    chat.child.expect_exact("stopped")
    chat.child.expect_exact(">>> ")
    wait_for(lambda: server.model_status()["num_running"] == 0, timeout=5.0)
    chat.child.sendeof()  # Ctrl-D leaves too
    chat.child.expect(pexpect.EOF)
    chat.child.close()
    assert chat.child.exitstatus == 0


class _InterruptAfterHeaders(logging.Handler):
    """Raises KeyboardInterrupt from inside httpx, after a response's headers have arrived and
    before httpx hands the response back: the moment no `with` has the response yet."""

    fired = False

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.fired and record.getMessage().startswith("HTTP Request: POST"):
            self.fired = True
            raise KeyboardInterrupt
        return True


def test_ctrl_c_between_headers_and_stream_still_hangs_up(server: Server) -> None:
    logger = logging.getLogger("httpx")
    handler, level = _InterruptAfterHeaders(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    client = ChatClient(server.base_url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 4000, "ignore_eos": True}
    try:
        with pytest.raises(KeyboardInterrupt):
            list(client.stream_chat(body, AnswerStats()))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler.fired
    wait_for(lambda: server.model_status()["num_running"] == 0, timeout=5.0)
    answer = "".join(client.stream_chat({**body, "max_tokens": 4}, AnswerStats()))
    assert answer  # the client still works after dropping its connections
    client.close()
