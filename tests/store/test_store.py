"""Names that could escape the store are refused; the store's writes are atomic and its
listing never shows a half-written model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pensieve.errors import InvalidModelFile, InvalidRequest, ModelNotFound
from pensieve.store.names import ModelName, parse_digest, parse_name
from pensieve.store.store import Manifest, ModelDefaults, ModelStore

TRAVERSAL = ["../evil", "..", "a/../../b", "/etc/passwd", "a//b", "./a", "a/./b:tag",
             "name:../x", "name:a/b", "a\\b", "a\x00b", "", " ", "a:b:c", "-a", ".hidden",
             "a/b/c/d", "x" * 301, "name:", "ｅvil", "a b", "a/.."]


@pytest.mark.parametrize("text", TRAVERSAL)
def test_traversal_and_odd_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_name(text)


def test_names_fold_case_and_imply_latest() -> None:
    assert parse_name("SmolLM2") == ModelName("smollm2", "latest")
    assert str(parse_name("hf.co/Owner/Repo-GGUF:Q4_K_M")) == "hf.co/owner/repo-gguf:q4_k_m"
    assert parse_name("a/b:v1.2").parts == ("a", "b", "v1.2")


@pytest.mark.parametrize("text", ["sha256:" + "a" * 63, "sha256:" + "g" * 64, "md5:" + "a" * 64,
                                  "sha256:../" + "a" * 61, "a" * 64])
def test_bad_digests_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_digest(text)


def test_digest_forms() -> None:
    assert parse_digest("sha256:" + "A" * 64) == "a" * 64
    assert parse_digest("sha256-" + "b" * 64) == "b" * 64


def test_import_list_show_copy_remove(default_model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    defaults = ModelDefaults(num_ctx=1024, system="Be brief.", temperature=0.2, stop=("END",))
    manifest = store.import_file(default_model, "smol:q4", defaults=defaults)
    assert manifest.digest == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert store.blob_path(manifest.digest).stat().st_size == manifest.size
    assert store.get("SMOL:q4").defaults == defaults
    store.copy("smol:q4", "team/smol")
    assert [str(m.name) for m in store.list()] == ["smol:q4", "team/smol:latest"]
    store.remove("smol:q4")
    assert store.blob_path(manifest.digest).exists()  # still named by team/smol
    store.remove("team/smol")
    assert not store.blob_path(manifest.digest).exists()
    assert store.list() == []
    assert not (store.manifests / "team").exists()
    with pytest.raises(ModelNotFound):
        store.remove("team/smol")


def test_a_bad_file_never_becomes_a_blob(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(InvalidModelFile):
        store.import_file(bad, "bad")
    assert store.list() == []
    assert not store.blobs.exists() or not any(store.blobs.iterdir())


def test_a_killed_write_leaves_nothing_listed(default_model: Path, tmp_path: Path) -> None:
    """What a kill leaves behind (a partial blob, a manifest's temporary file, a manifest
    naming a blob that never arrived) is not listed."""
    store = ModelStore(tmp_path / "models")
    store.partial.mkdir(parents=True)
    (store.partial / "pull-123").write_bytes(b"GGUF half a file")
    folder = store.manifests / "half"
    folder.mkdir(parents=True)
    (folder / ".latest.json.tmp999").write_text('{"schema": 1, "name": "half"')
    (folder / "broken.json").write_text('{"schema": 1, "name": "half", "tag": "bro')
    assert store.list() == []
    with pytest.raises(InvalidRequest):  # a manifest is only written for a blob that exists
        store.write_manifest(Manifest(parse_name("ghost"), "c" * 64, 1, "test"))
    assert store.list() == []


def test_manifest_writes_replace_atomically(default_model: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "models")
    store.import_file(default_model, "smol", link=True)
    before = store.manifest_path(parse_name("smol")).read_text()

    def crash(*_args: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.copy("smol", "smol")  # rewrites smol's manifest
    assert store.manifest_path(parse_name("smol")).read_text() == before


@pytest.mark.parametrize("defaults", [{"num_ctx": "big"}, {"num_ctx": 10}, {"colour": 1},
                                      {"stop": 5}, {"temperature": "hot"}, {"stop": [1]},
                                      {"system": 3}, {"temperature": 9.0}, {"num_predict": 0}])
def test_bad_defaults_are_refused(defaults: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        ModelDefaults.from_dict(defaults)


def test_model_defaults_fill_only_unset_request_fields() -> None:
    from pensieve.api.model_defaults import fill_defaults, with_system_prompt
    from pensieve.api.openai.protocol import ChatCompletionRequest

    defaults = ModelDefaults(temperature=0.3, top_k=7, stop=("END",), num_predict=9,
                             system="Be brief.")
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0}
    ).to_generate()
    filled = fill_defaults(req.params, req.sent, defaults)
    assert (filled.temperature, filled.top_k, filled.stop, filled.max_tokens) == \
        (1.0, 7, ("END",), 9)
    capped = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}],
         "max_completion_tokens": 2}).to_generate()
    assert fill_defaults(capped.params, capped.sent, defaults).max_tokens == 2
    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user, defaults)[0] == {"role": "system", "content": "Be brief."}
    own = [{"role": "system", "content": "x"}, *user]
    assert with_system_prompt(own, defaults) == own


def _age(path: Path, seconds: float) -> None:
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


def test_prune_removes_only_old_unnamed_files(default_model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    kept = store.import_file(default_model, "kept")  # a copy: its age is changed below
    orphan = store.blob_path("ab" * 32)
    orphan.write_bytes(b"an upload no create ever named")
    fresh_orphan = store.blob_path("cd" * 32)
    fresh_orphan.write_bytes(b"an upload whose create may be on its way")
    crashed = store.partial / "upload-1-2"
    crashed.write_bytes(b"half an upload")
    resumable = store.partial / "pull-0123"
    resumable.write_bytes(b"half a download, resumed by the next pull")
    for path in (store.blob_path(kept.digest), orphan, crashed, resumable):
        _age(path, 7200)
    removed = store.prune(min_age_s=3600)
    assert sorted(removed) == sorted([orphan, crashed])
    assert store.blob_path(kept.digest).is_file() and fresh_orphan.is_file()
    assert resumable.is_file()
    assert [str(m.name) for m in store.list()] == ["kept:latest"]


def test_prune_keeps_everything_while_a_manifest_is_unreadable(default_model: Path,
                                                               tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    kept = store.import_file(default_model, "kept", link=True)
    orphan = store.blob_path("ab" * 32)
    orphan.write_bytes(b"maybe the blob of the broken manifest")
    _age(orphan, 7200)
    broken = store.manifests / "broken" / "latest.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    assert store.prune(min_age_s=3600) == []
    assert orphan.is_file() and store.blob_path(kept.digest).is_file()
