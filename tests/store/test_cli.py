"""`pensieve import|list|show|cp|rm|pull` on a store folder, as a user types them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pensieve.cli.main import main
from pensieve.store.default_model import SHA256
from tests.store.fake_hub import FakeHub


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_import_show_copy_list_remove(default_model: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--models-dir", str(tmp_path / "models")]
    code, out = run(capsys, "import", str(default_model), "--name", "Smol:Q4", "--ctx-size",
                    "1024", "--system", "Be brief.", "--param", "temperature=0.2",
                    "--param", 'stop=["END"]', *store)
    assert code == 0 and "imported smol:q4" in out
    code, out = run(capsys, "show", "smol:q4", *store)
    assert code == 0
    for fact in ("llama", "135M", "Q4_1", "8192", "apache-2.0", '"num_ctx": 1024',
                 '"temperature": 0.2', "<|im_start|>"):
        assert fact in out, fact
    assert run(capsys, "cp", "smol:q4", "team/smol", *store)[0] == 0
    code, out = run(capsys, "list", *store)
    assert "smol:q4" in out and "team/smol:latest" in out and SHA256[:12] in out
    assert run(capsys, "rm", "smol:q4", *store)[0] == 0
    code, out = run(capsys, "list", *store)
    assert "smol:q4" not in out and "team/smol:latest" in out


@pytest.mark.parametrize("argv", [["rm", "../../etc"], ["show", "missing"],
                                  ["cp", "missing", "x"], ["import", "/etc/hostname", "--name",
                                                           "x"],
                                  ["import", "/etc/hostname", "--name", "../x"]])
def test_errors_are_one_clear_line(argv: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, *argv, "--models-dir", str(tmp_path / "models"))
    assert code == 1 and out.startswith("Error:")
    assert "Traceback" not in out


def test_pull_shows_progress_and_stores_the_model(default_model: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    hub = FakeHub(files={"smol.gguf": default_model}).start()
    try:
        code, out = run(capsys, "pull", f"{hub.url}/files/smol.gguf", "--sha256", SHA256,
                        "--name", "pulled", "--models-dir", str(tmp_path / "models"),
                        "--pull-allow", "127.0.0.1")
    finally:
        hub.stop()
    assert code == 0, out
    assert "pulling" in out and "success" in out and "pulled pulled:latest" in out
    assert "pulled:latest" in run(capsys, "list", "--models-dir", str(tmp_path / "models"))[1]


def test_serve_refuses_a_corrupt_model_file_before_loading_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pensieve.config import default_data_dir
    from pensieve.store.default_model import ensure_default_model
    from tests.store.gguf_variants import VARIANTS, layout_of, write_variant

    layout = layout_of(ensure_default_model(default_data_dir()))
    variant = next(v for v in VARIANTS if v.name == "absurd-array-length")
    bad = write_variant(variant, layout, tmp_path / "bad.gguf")
    code, out = run(capsys, "serve", "--model", str(bad), "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "Cannot start" in out and "claims" in out


def test_pull_from_inside_the_network_needs_pull_allow(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused without the setting; with it (flag, variable or config file) the pull reaches
    the server, whose 404 shows it got through."""
    monkeypatch.delenv("PENSIEVE_PULL_ALLOW", raising=False)
    monkeypatch.delenv("PENSIEVE_CONFIG", raising=False)
    hub = FakeHub().start()
    pull = ["pull", f"{hub.url}/files/missing.gguf", "--models-dir", str(tmp_path / "models")]
    config = tmp_path / "pensieve.toml"
    config.write_text('pull_allow = ["127.0.0.0/8"]\n')
    try:
        code, out = run(capsys, *pull)
        said = " ".join(out.split())  # the console wraps long lines
        assert code == 1 and "Error: Refusing to pull from" in said
        assert "127.0.0.1 is a loopback address" in said and "pull_allow" in said
        assert hub.requests == []
        assert "HTTP 404" in run(capsys, *pull, "--pull-allow", "127.0.0.1")[1]
        monkeypatch.setenv("PENSIEVE_PULL_ALLOW", f"127.0.0.1:{hub.port}")
        assert "HTTP 404" in run(capsys, *pull)[1]
        monkeypatch.delenv("PENSIEVE_PULL_ALLOW")
        monkeypatch.setenv("PENSIEVE_CONFIG", str(config))
        assert "HTTP 404" in run(capsys, *pull)[1]
        code, out = run(capsys, *pull, "--pull-allow", "not a host")
        assert code == 1 and "pull_allow" in out and "Traceback" not in out
    finally:
        hub.stop()
    assert len(hub.requests) == 3
