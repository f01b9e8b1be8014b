"""Pensieve's memory end to end: a conversation survives a restart, through the disk tier, and
damaged memory files are ignored, never served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.support.server import (
    MODEL,
    Server,
    assert_same_greedy_run,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.e2e

QUESTIONS = ["What is the capital of France?", "And of Italy?", "And of Spain?",
             "And of Portugal?"]


def memory_files(data: Path) -> list[Path]:
    """What the disk tier holds: KV blocks, and whole snapshots (layouts not cut into blocks)."""
    return [p for p in (data / "memory").rglob("*") if p.suffix in (".kv", ".kvb")]


def turn(server: Server, messages: list[dict], **extra) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0, **extra}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def converse(server: Server, num_turns: int) -> tuple[list[dict], int]:
    """Returns the history and the prompt length of the last turn."""
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    prompt_tokens = 0
    for q in QUESTIONS[:num_turns]:
        messages.append({"role": "user", "content": q})
        reply = turn(server, messages)
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        prompt_tokens = reply["usage"]["prompt_tokens"]
    return messages, prompt_tokens


def fourth_turn(server: Server, history: list[dict], **extra) -> dict:
    return turn(server, [*history, {"role": "user", "content": QUESTIONS[3]}], logprobs=True,
                top_logprobs=5, **extra)


def assert_same_answer(a: dict, b: dict) -> None:
    """Two greedy answers to the same prompt computed on servers whose KV caches were laid out
    differently: equal up to a near-tie (docs/memory.md, "Determinism")."""
    assert_same_greedy_run(a["choices"][0]["logprobs"]["content"],
                           b["choices"][0]["logprobs"]["content"])


def clean_fourth_turn(tmp_path: Path, history: list[dict]) -> dict:
    """The fourth turn computed by a new server with memory off, as its first request."""
    server = start_server(tmp_path, "--no-prefix-cache", data_dir=tmp_path / "clean-data")
    try:
        return fourth_turn(server, history)
    finally:
        stop_server(server)


def first_three_turns(tmp_path: Path, data: Path, *flags: str) -> tuple[list[dict], int]:
    """Three turns on a server over `data`, then stop it. Returns the history and the last
    turn's prompt length."""
    server = start_server(tmp_path, *flags, data_dir=data)
    try:
        return converse(server, 3)
    finally:
        stop_server(server)


def fourth_turn_after_restart(tmp_path: Path, data: Path, history: list[dict], *flags: str,
                              reference: bool = False) -> tuple[dict, dict, dict | None]:
    """The fourth turn on a new server over `data`: (reply, memory counters, and with
    `reference` the same turn computed there with memory off)."""
    server = start_server(tmp_path, *flags, data_dir=data)
    try:
        reply = fourth_turn(server, history)
        fresh = fourth_turn(server, history, cache_prompt=False) if reference else None
        memory = server.model_status()["memory"]
    finally:
        stop_server(server)
    return reply, memory, fresh


def _stream_until_stopped(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                          timeout=120) as r:
            for _ in r.iter_lines():
                pass
    except httpx.HTTPError:
        pass  # the server went away under it: that is the point


def test_a_stop_that_signals_the_worker_too_keeps_the_last_turn(tmp_path: Path) -> None:
    # systemd stops a unit by signalling all its processes, a terminal's Ctrl-C signals the
    # whole foreground group: the worker must still save and flush what only its context holds.
    # A long answer streams meanwhile, so the engine is never idle and the turns stay unsaved
    # until the stop.
    data = tmp_path / "data"
    server = start_server(tmp_path, "--shutdown-timeout", "1", data_dir=data)
    busy = threading.Thread(target=_stream_until_stopped, args=(server,), daemon=True)
    try:
        busy.start()
        wait_for(lambda: server.model_status()["num_running"] >= 1, timeout=60)
        history, last_prompt = converse(server, 3)
        assert server.model_status()["num_running"] >= 1  # still busy: nothing saved yet
        os.kill(server.model_status()["pid"], signal.SIGTERM)
    finally:
        stop_server(server)
        busy.join(30)
    restored, memory, _ = fourth_turn_after_restart(tmp_path, data, history)
    # at least the whole third turn's prompt came back (whether its answer's tokens do too
    # depends on the answer's text, which the stream computed alongside may perturb)
    assert restored["usage"]["prompt_tokens_details"]["cached_tokens"] >= last_prompt
    assert memory["hits"]["disk"] >= 1


@pytest.mark.parametrize("flags", [(), ("--no-memory-reuse-generated",)],
                         ids=["default", "prompt-kv-only"])
def test_a_conversation_continues_from_disk_after_a_restart(
        tmp_path: Path, flags: tuple[str, ...]) -> None:
    data = tmp_path / "data"
    history, last_prompt = first_three_turns(tmp_path, data, *flags)
    assert memory_files(data)
    restored, memory, fresh = fourth_turn_after_restart(tmp_path, data, history, *flags,
                                                        reference=True)
    assert fresh is not None
    cached = restored["usage"]["prompt_tokens_details"]["cached_tokens"]
    if flags:  # the whole third turn's prompt came back from disk, its answer is recomputed
        assert cached == last_prompt
    else:  # the third turn's answer came back too: only the new message is computed
        assert cached > last_prompt
    assert memory["hits"]["disk"] >= 1 and memory["tokens_saved"]["disk"] >= cached
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert_same_answer(restored, fresh)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_memory_files_are_ignored_and_the_answer_is_still_right(
        tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    history, _ = first_three_turns(tmp_path, data)
    files = memory_files(data)
    assert files
    for path in files:
        raw = bytearray(path.read_bytes())
        if damage == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            raw[-100] ^= 0xFF
        path.write_bytes(bytes(raw))
    got, memory, _ = fourth_turn_after_restart(tmp_path, data, history)
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert memory["hits"]["disk"] == 0
    # recomputed in full as the new server's first request, so exactly what a clean server says
    expected = clean_fourth_turn(tmp_path, history)
    assert got["choices"][0] == expected["choices"][0]


def test_memory_can_be_listed_and_deleted_over_http_and_from_the_cli(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        history, _ = converse(server, 2)
        listing = httpx.get(f"{server.base_url}/admin/memory", timeout=30).json()
        entries = listing["entries"]
        assert entries and all({"ram", "disk"} <= set(e["tiers"]) for e in entries)
        assert "What is the capital" not in str(listing)  # no prompt text, only token hashes
        key = entries[0]["key"]
        shown = httpx.get(f"{server.base_url}/admin/memory/{key}", timeout=30).json()
        assert shown["num_tokens"] == entries[0]["num_tokens"]
        cli = [sys.executable, "-m", "pensieve.cli", "cache", "--url", server.base_url]
        out = subprocess.run([*cli, "list"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "200"})
        assert out.returncode == 0 and key in out.stdout
        assert subprocess.run([*cli, "rm", key], capture_output=True, timeout=60).returncode == 0
        missing = httpx.get(f"{server.base_url}/admin/memory/{key}", timeout=30)
        assert missing.status_code == 404
        assert subprocess.run([*cli, "clear"], capture_output=True, timeout=60).returncode == 0
        assert httpx.get(f"{server.base_url}/admin/memory", timeout=30).json()["entries"] == []
        assert not memory_files(tmp_path / "data")
        # with nothing remembered, the next turn is computed in full
        again = turn(server, history)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        stop_server(server)


def test_a_turn_served_from_the_ram_tier_matches_a_fresh_computation(tmp_path: Path) -> None:
    # One sequence slot and no disk tier: another conversation pushes ours out of the llama
    # context, so its next turn can only come back from RAM.
    server = start_server(tmp_path, "--parallel", "1", "--memory-disk-mb", "0")
    try:
        history, last_prompt = converse(server, 2)
        other = [{"role": "user", "content": "Write a word about rain."}]
        turn(server, other)
        restored = fourth_turn(server, history)
        fresh = fourth_turn(server, history, cache_prompt=False)
        memory = server.model_status()["memory"]
    finally:
        stop_server(server)
    assert restored["usage"]["prompt_tokens_details"]["cached_tokens"] >= last_prompt
    assert memory["hits"]["ram"] >= 1 and memory["hits"]["disk"] == 0
    assert_same_answer(restored, fresh)


def test_ram_and_disk_budgets_hold_under_many_conversations(tmp_path: Path) -> None:
    assert_budgets_hold(tmp_path, ram_mb=4, disk_mb=8)


def assert_budgets_hold(tmp_path: Path, *, ram_mb: int, disk_mb: int) -> None:
    """12 short conversations on budgets too small for all of them (at f16: 4 and 8 MiB)."""
    server = start_server(tmp_path, "--memory-ram-mb", str(ram_mb), "--memory-disk-mb",
                          str(disk_mb))
    try:
        for i in range(12):
            turn(server, [{"role": "user", "content": f"Tell me fact number {i} about owls."}])
        listing = httpx.get(f"{server.base_url}/admin/memory", timeout=30).json()
        server.proc.send_signal(15)  # graceful stop flushes the disk writer
        server.proc.wait(30)
    finally:
        stop_server(server)
    entries = listing["entries"]
    ram = sum(e.get("ram_bytes", 0) for e in entries)
    disk_files = memory_files(tmp_path / "data")
    assert len(entries) >= 3  # something is remembered ...
    assert ram <= ram_mb << 20  # ... within the RAM budget
    assert sum(p.stat().st_size for p in disk_files) <= disk_mb << 20  # ... and the disk budget
    assert len(disk_files) < 12  # so older conversations were evicted


def test_two_models_never_share_memory(tmp_path: Path, default_model: Path) -> None:
    # A second model file: the same weights plus trailing bytes, so a different sha256 digest.
    other = tmp_path / "other.gguf"
    other.write_bytes(default_model.read_bytes() + b"\0" * 64)
    data = tmp_path / "data"
    history, _ = first_three_turns(tmp_path, data)
    reply, memory, _ = fourth_turn_after_restart(tmp_path, data, history, "--model", str(other))
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert memory["hits"]["disk"] == 0
    assert len(list((data / "memory").iterdir())) == 2  # one namespace per model file
