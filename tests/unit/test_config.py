from pathlib import Path

import pytest
from pydantic import ValidationError

from pensieve.cli.main import build_parser
from pensieve.config import load_settings
from pensieve.errors import PensieveError


def test_defaults_are_safe() -> None:
    s = load_settings({})
    assert s.host == "127.0.0.1"
    assert s.model is None


def test_precedence_cli_over_env_over_toml(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('port = 9001\nparallel = 4\nctx_size = 4096\n')
    monkeypatch.setenv("PENSIEVE_PARALLEL", "6")
    s = load_settings({"ctx_size": 2048}, cfg)
    assert (s.port, s.parallel, s.ctx_size) == (9001, 6, 2048)


def test_config_file_from_environment(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('threads = 3\n')
    monkeypatch.setenv("PENSIEVE_CONFIG", str(cfg))
    assert load_settings({}).threads == 3


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings({"port": 70000})
    cfg = tmp_path / "p.toml"
    cfg.write_text('no_such_key = 1\n')
    with pytest.raises(ValidationError):
        load_settings({}, cfg)
    with pytest.raises(FileNotFoundError):
        load_settings({}, tmp_path / "missing.toml")


def test_every_setting_is_a_flag() -> None:
    args = build_parser().parse_args(
        ["serve", "--ctx-size", "1024", "--no-kv-unified", "--flash-attn", "off",
         "--model", "/m.gguf", "--threads", "2"])
    assert (args.ctx_size, args.kv_unified, args.flash_attn, args.model, args.threads) == (
        1024, False, "off", "/m.gguf", 2)


@pytest.fixture
def redis_findable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setting's checks need only that the redis package can be found: the default suite
    runs without the cluster extra installed, so its spec is made up here."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: importlib.machinery.ModuleSpec("redis", None) if name == "redis"
        else real(name, *a))


@pytest.mark.usefixtures("redis_findable")
def test_the_shared_memory_tier_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_MEMORY_SHARED", "redis://:pw@10.0.0.5:6380/2")
    s = load_settings({"memory_shared_ttl_s": 60})
    memory = s.memory_config("digest")
    assert memory is not None and memory.shared is not None
    assert (memory.shared.url, memory.shared.ttl_s) == ("redis://:pw@10.0.0.5:6380/2", 60)
    assert load_settings({"memory_shared": "rediss://cache.example:6380"}).memory_shared
    monkeypatch.delenv("PENSIEVE_MEMORY_SHARED")
    assert load_settings({}).memory_config("digest").shared is None  # type: ignore[union-attr]
    for bad in ("http://host:6379", "redis://", "redis://host:notaport", "host:6379"):
        with pytest.raises(ValidationError, match="redis://"):
            load_settings({"memory_shared": bad})
    with pytest.raises(ValidationError, match="memory-block-tokens"):
        load_settings({"memory_shared": "redis://h:6379", "memory_block_tokens": 0})


def test_a_missing_redis_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "redis" else real(name, *a))
    settings = load_settings({"memory_shared": "redis://:pw@h:6379"})
    with pytest.raises(PensieveError, match=r"pensieve-server\[cluster\]") as caught:
        settings.memory_config("digest")
    assert "pw" not in str(caught.value)


@pytest.mark.usefixtures("redis_findable")
def test_the_shared_tier_is_namespaced_by_the_llama_cpp_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pensieve.config

    s = load_settings({"memory_shared": "redis://h:6379"})
    names = []
    for version in ("0.3.36", "0.3.37"):
        monkeypatch.setattr(pensieve.config, "llama_cpp_version", lambda v=version: v)
        memory = s.memory_config("digest")
        assert memory is not None and memory.shared is not None
        names.append((memory.namespace, memory.shared.namespace))
    assert names[0][0] == names[1][0]  # the disk tier's namespace does not change
    assert names[0][1] != names[1][1]
