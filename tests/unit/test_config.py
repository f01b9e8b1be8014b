from pathlib import Path

import pytest
from pydantic import ValidationError

from pensieve.cli.main import build_parser
from pensieve.config import load_settings


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
