"""Pulls from a loopback HTTP server and from a stand-in for the Hugging Face endpoint, through
the same code users get. The server is on loopback, so every pull here passes the policy that
`pull_allow = 127.0.0.1` builds (tests/store/test_pull_guard.py covers the refusals)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pensieve.errors import InvalidModelFile, InvalidRequest
from pensieve.store.default_model import SHA256
from pensieve.store.netguard import NetPolicy
from pensieve.store.pull import PullFailed, PullProgress, pull
from pensieve.store.store import ModelStore
from tests.store.fake_hub import FakeHub, HubRepo
from tests.store.gguf_variants import VARIANTS, Layout, write_variant

LOOPBACK = NetPolicy.from_entries(["127.0.0.1"])


@pytest.fixture
def hub(default_model: Path) -> Iterator[FakeHub]:
    fake = FakeHub(files={"smol.gguf": default_model}).start()
    yield fake
    fake.stop()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _names(store: ModelStore) -> list[str]:
    return [str(m.name) for m in store.list()]


def test_pull_a_url_with_a_pinned_digest(hub: FakeHub, store: ModelStore) -> None:
    events: list[PullProgress] = []
    manifest = pull(store, f"{hub.url}/files/smol.gguf#sha256={SHA256}", progress=events.append,
                    policy=LOOPBACK)
    assert manifest.digest == SHA256 and str(manifest.name) == "smol:latest"
    assert _names(store) == ["smol:latest"]
    assert [e.status for e in events][-3:] == ["verifying sha256 digest", "writing manifest",
                                               "success"]
    done = [e.completed for e in events if e.completed is not None]
    assert done == sorted(done) and done[-1] == manifest.size
    assert not any(store.partial.iterdir())


def test_an_interrupted_download_resumes_where_it_stopped(hub: FakeHub, store: ModelStore,
                                                          default_model: Path) -> None:
    size = default_model.stat().st_size
    hub.cut_next_after = 30 << 20
    url = f"{hub.url}/files/smol.gguf"
    with pytest.raises(PullFailed, match="pull again to resume"):
        pull(store, url, name="smol", sha256=SHA256, policy=LOOPBACK)
    assert _names(store) == []  # nothing half-listed
    (partial,) = store.partial.iterdir()
    assert partial.stat().st_size == 30 << 20
    pull(store, url, name="smol", sha256=SHA256, policy=LOOPBACK)
    assert _names(store) == ["smol:latest"]
    ranges = [h.get("range") for path, h in hub.requests if path == "/files/smol.gguf"]
    assert ranges == [None, f"bytes={30 << 20}-"]
    assert hub.bytes_sent == size  # every byte crossed the wire once


def test_a_corrupted_download_is_refused(hub: FakeHub, store: ModelStore,
                                         default_model: Path, tmp_path: Path) -> None:
    corrupted = tmp_path / "flipped.gguf"
    shutil.copyfile(default_model, corrupted)
    with open(corrupted, "r+b") as f:  # one byte of tensor data: still a well-formed GGUF
        f.seek(60_000_000)
        byte = f.read(1)
        f.seek(60_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    hub.files["smol.gguf"] = corrupted
    with pytest.raises(InvalidRequest, match="sha256 mismatch") as caught:
        pull(store, f"{hub.url}/files/smol.gguf", sha256=SHA256, policy=LOOPBACK)
    assert caught.value.code == "digest_mismatch"
    assert _names(store) == [] and not any(store.partial.iterdir())
    assert not store.blobs.exists() or not any(store.blobs.iterdir())


def test_a_download_that_is_not_a_gguf_is_refused(hub: FakeHub, store: ModelStore,
                                                  layout: Layout, tmp_path: Path) -> None:
    variant = next(v for v in VARIANTS if v.name == "tensor-past-end")
    hub.files["bad.gguf"] = write_variant(variant, layout, tmp_path / "bad.gguf")
    with pytest.raises(InvalidModelFile, match="past the end"):
        pull(store, f"{hub.url}/files/bad.gguf", policy=LOOPBACK)
    assert _names(store) == []


def test_an_http_error_is_reported(hub: FakeHub, store: ModelStore) -> None:
    with pytest.raises(PullFailed, match="HTTP 404"):
        pull(store, f"{hub.url}/files/missing.gguf", policy=LOOPBACK)


@pytest.fixture
def hf(hub: FakeHub, default_model: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub.repos["test-owner/SmolLM2-GGUF"] = HubRepo({
        "README.md": Path(__file__),
        "SmolLM2-135M-Instruct.Q4_1.gguf": default_model,
        "sub/SmolLM2-copy.gguf": default_model,
    })
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return hub


def test_pull_from_hugging_face_by_quantisation(hf: FakeHub, store: ModelStore) -> None:
    manifest = pull(store, "hf.co/test-owner/SmolLM2-GGUF:Q4_1", policy=LOOPBACK)
    assert str(manifest.name) == "hf.co/test-owner/smollm2-gguf:q4_1"
    assert manifest.digest == SHA256
    # these two requests are all the pull sends (huggingface_hub's own client sends nothing),
    # so all of it went through the guarded path
    paths = [path for path, _ in hf.requests]
    assert paths == ["/api/models/test-owner/SmolLM2-GGUF/tree/main",
                     "/test-owner/SmolLM2-GGUF/resolve/main/SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert all(h.get("authorization") == "Bearer hf_test_token" for _, h in hf.requests)


def test_pull_a_file_path_from_hugging_face(hf: FakeHub, store: ModelStore) -> None:
    manifest = pull(store, "huggingface.co/test-owner/SmolLM2-GGUF/sub/SmolLM2-copy.gguf",
                    name="copy:v1", policy=LOOPBACK)
    assert str(manifest.name) == "copy:v1" and manifest.digest == SHA256


def test_a_hugging_face_tree_in_pages_is_read_to_the_end(hf: FakeHub, store: ModelStore) -> None:
    hf.repos["test-owner/SmolLM2-GGUF"].page_size = 1  # the Q4_1 file is on the second page
    manifest = pull(store, "hf.co/test-owner/SmolLM2-GGUF:Q4_1", policy=LOOPBACK)
    assert manifest.digest == SHA256
    trees = [path for path, _ in hf.requests if path.endswith("/tree/main")]
    assert len(trees) == 3


def test_hugging_face_digest_mismatch_is_refused(hf: FakeHub, store: ModelStore) -> None:
    hf.repos["test-owner/SmolLM2-GGUF"].sha256_override["SmolLM2-135M-Instruct.Q4_1.gguf"] = \
        "ab" * 32
    with pytest.raises(InvalidRequest, match="sha256 mismatch"):
        pull(store, "hf.co/test-owner/SmolLM2-GGUF:Q4_1", policy=LOOPBACK)
    assert _names(store) == []


def test_hugging_face_missing_quantisation_lists_what_is_there(hf: FakeHub,
                                                               store: ModelStore) -> None:
    with pytest.raises(InvalidRequest, match="no Q8_0 GGUF file.*Q4_1.gguf"):
        pull(store, "hf.co/test-owner/SmolLM2-GGUF:Q8_0", policy=LOOPBACK)


def test_hugging_face_unknown_repo(hf: FakeHub, store: ModelStore) -> None:
    with pytest.raises(PullFailed, match="Could not list test-owner/nothing"):
        pull(store, "hf.co/test-owner/nothing:Q4_1", policy=LOOPBACK)


@pytest.mark.parametrize("spec", ["ftp://x/y.gguf", "smol", "hf.co/onlyowner", "https://"])
def test_unpullable_sources_are_refused(spec: str, store: ModelStore) -> None:
    with pytest.raises(InvalidRequest):
        pull(store, spec)


def test_two_pulls_of_one_url_do_not_share_a_partial_file(hub: FakeHub, store: ModelStore,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import pensieve.store.pull as pull_module

    url = f"{hub.url}/files/smol.gguf"
    errors: list[Exception] = []
    real_download = pull_module.download

    def download_while_another_pull_starts(*args: object) -> None:
        try:
            pull(store, url, policy=LOOPBACK)
        except InvalidRequest as exc:
            errors.append(exc)
        real_download(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pull_module, "download", download_while_another_pull_starts)
    pull(store, url, sha256=SHA256, policy=LOOPBACK)
    assert len(errors) == 1 and errors[0].code == "pull_in_progress"
    assert _names(store) == ["smol:latest"]
