"""Pensieve's memory with a q8_0 KV cache: every e2e test of memory (turn reuse, restarts, tier
restores, budgets, damaged files) again on servers started with --cache-type-k/-v q8_0, and
snapshots of one cache type are never restored into another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pensieve.store.gguf import read_gguf
from tests.e2e.test_memory import (  # noqa: F401 - collected again here, on a q8_0 cache
    assert_budgets_hold,
    converse,
    first_three_turns,
    fourth_turn_after_restart,
    test_a_conversation_continues_from_disk_after_a_restart,
    test_a_turn_served_from_the_ram_tier_matches_a_fresh_computation,
    test_damaged_memory_files_are_ignored_and_the_answer_is_still_right,
    test_memory_can_be_listed_and_deleted_over_http_and_from_the_cli,
    test_two_models_never_share_memory,
)
from tests.support.server import start_server, stop_server

pytestmark = pytest.mark.e2e

F16 = ("--cache-type-k", "f16", "--cache-type-v", "f16")  # flags beat the environment


@pytest.fixture(autouse=True)
def q8_0_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every server these tests start (start_server passes the environment on) uses q8_0."""
    monkeypatch.setenv("PENSIEVE_CACHE_TYPE_K", "q8_0")
    monkeypatch.setenv("PENSIEVE_CACHE_TYPE_V", "q8_0")
    yield


def test_ram_and_disk_budgets_hold_under_many_conversations_at_half_the_size(
        tmp_path: Path) -> None:
    # a q8_0 conversation takes about half the bytes: all 12 would fit the f16 test's budgets
    assert_budgets_hold(tmp_path, ram_mb=2, disk_mb=4)


def test_snapshots_of_one_kv_type_are_never_restored_into_another(tmp_path: Path) -> None:
    data = tmp_path / "data"
    history, _ = first_three_turns(tmp_path, data, *F16)
    reply, memory, _ = fourth_turn_after_restart(tmp_path, data, history)  # now q8_0
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert memory["hits"]["disk"] == 0
    assert len(list((data / "memory").iterdir())) == 2  # one namespace per KV type
    # the f16 snapshots are still there for an f16 server
    again, memory, _ = fourth_turn_after_restart(tmp_path, data, history, *F16)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert memory["hits"]["disk"] >= 1


def test_a_q8_0_cache_remembers_a_token_in_about_half_the_bytes(
        tmp_path: Path, default_model: Path) -> None:
    server = start_server(tmp_path)
    try:
        converse(server, 2)
        entries = httpx.get(f"{server.base_url}/admin/memory", timeout=30).json()["entries"]
    finally:
        stop_server(server)
    held = [e for e in entries if e.get("ram_bytes")]
    assert held
    f16_per_token = read_gguf(default_model).kv_bytes_per_token()
    for entry in held:
        per_token = entry["ram_bytes"] / entry["num_tokens"]
        assert 0.45 * f16_per_token < per_token < 0.6 * f16_per_token  # q8_0: 34/64
