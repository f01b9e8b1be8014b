"""The runtime's budget: least recently used idle models are unloaded to make room; busy ones
never are; keep_alive unloads idle ones. Fake worker clients, no model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pensieve.errors import InvalidRequest
from pensieve.runtime import LifecycleConfig, ModelRuntime, ServedModel
from pensieve.store.durations import parse_keep_alive


class FakeClient:
    def __init__(self) -> None:
        self.is_running = False
        self.num_in_flight = 0
        self.last_active = time.monotonic()
        self.num_stops = 0

    def touch(self) -> None:
        self.last_active = time.monotonic()

    async def stop(self) -> None:
        self.is_running = False
        self.num_stops += 1

    async def stop_if_idle(self) -> bool:
        if self.num_in_flight or not self.is_running:
            return False
        await self.stop()
        return True


def _runtime(budget_mib: int, max_loaded: int = 0, keep_alive: float | None = None
             ) -> tuple[ModelRuntime, dict[str, ServedModel]]:
    runtime = ModelRuntime(lifecycle=LifecycleConfig(budget_mib << 20, max_loaded, keep_alive))
    models = {}
    for name in ("a", "b", "c"):
        served = ServedModel(name, FakeClient(), num_weight_bytes=60 << 20,  # type: ignore[arg-type]
                             num_kv_bytes=40 << 20, keep_alive=keep_alive,
                             default_keep_alive=keep_alive)
        runtime._models[name] = served
        models[name] = served
    return runtime, models


def _load(runtime: ModelRuntime, served: ServedModel) -> None:
    assert asyncio.run(runtime._make_room(served))
    served.client.is_running = True  # type: ignore[misc]
    served.client.touch()


def test_least_recently_used_idle_model_is_unloaded() -> None:
    runtime, m = _runtime(budget_mib=250)
    _load(runtime, m["a"])
    _load(runtime, m["b"])
    m["a"].client.touch()  # a is used again: b is now the least recently used
    _load(runtime, m["c"])
    assert [n for n, s in m.items() if s.client.is_running] == ["a", "c"]


def test_busy_models_are_never_unloaded() -> None:
    runtime, m = _runtime(budget_mib=250)
    _load(runtime, m["a"])
    _load(runtime, m["b"])
    m["a"].client.num_in_flight = m["b"].client.num_in_flight = 1  # type: ignore[misc]
    assert asyncio.run(runtime._make_room(m["c"])) is False  # wait for room
    assert m["a"].client.is_running and m["b"].client.is_running


def test_max_loaded_models_counts_too() -> None:
    runtime, m = _runtime(budget_mib=10_000, max_loaded=1)
    _load(runtime, m["a"])
    _load(runtime, m["b"])
    assert not m["a"].client.is_running and m["b"].client.is_running


def test_a_model_bigger_than_the_budget_is_refused() -> None:
    runtime, m = _runtime(budget_mib=50)
    with pytest.raises(InvalidRequest, match="more than the whole memory budget"):
        asyncio.run(runtime._make_room(m["a"]))


def test_keep_alive_unloads_only_idle_expired_models() -> None:
    runtime, m = _runtime(budget_mib=10_000, keep_alive=0.05)
    for name in ("a", "b", "c"):
        _load(runtime, m[name])
    m["b"].client.num_in_flight = 1  # type: ignore[misc]
    runtime.set_keep_alive(m["c"], None)
    time.sleep(0.1)
    asyncio.run(runtime.reap_idle())
    assert [n for n, s in m.items() if s.client.is_running] == ["b", "c"]


def test_unknown_and_odd_names_are_not_found(tmp_path: Path) -> None:
    from pensieve.errors import ModelNotFound
    from pensieve.store.store import ModelStore

    runtime = ModelRuntime(store=ModelStore(tmp_path))
    for name in ("nope", "../x", "", "a:b:c"):
        with pytest.raises(ModelNotFound):
            runtime.get(name)


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300.0), ("1h30m", 5400.0), (0, 0.0),
                                               ("2.5", 2.5), ("500ms", 0.5), (-1, None),
                                               ("-1m", None)])
def test_keep_alive_durations(text: object, seconds: float | None) -> None:
    assert parse_keep_alive(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5q", "", True, [1], "m5", float("nan")])
def test_bad_keep_alive_is_refused(text: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_keep_alive(text)


def test_a_model_removed_behind_the_servers_back_is_gone(tmp_path: Path) -> None:
    from pensieve.config import Settings, default_data_dir
    from pensieve.errors import ModelNotFound
    from pensieve.store.default_model import ensure_default_model
    from pensieve.store.store import ModelStore

    store = ModelStore(tmp_path / "models")
    store.import_file(ensure_default_model(default_data_dir()), "m", link=True)
    settings = Settings(data_dir=tmp_path)
    runtime = ModelRuntime(store, lambda path, digest, _d: settings.engine_config(path, digest))
    assert runtime.get("M:latest") is runtime.get("m")
    store.remove("m")  # `pensieve rm` while the server runs
    with pytest.raises(ModelNotFound):
        runtime.get("m")


def test_a_request_without_keep_alive_gets_the_default_back() -> None:
    runtime, m = _runtime(budget_mib=10_000, keep_alive=30.0)
    runtime.apply_keep_alive(m["a"], 0)
    assert m["a"].keep_alive == 0.0
    runtime.apply_keep_alive(m["a"], None)
    assert m["a"].keep_alive == 30.0
    runtime.apply_keep_alive(m["a"], "-1")
    assert m["a"].keep_alive is None
