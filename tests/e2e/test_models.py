"""The model store and lifecycle through the real server: Ollama's model routes driven by the
official `ollama` client, pulls into a running server, corrupt files refused while it keeps
serving, keep_alive and the memory budget unloading what they should."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from openai import OpenAI

from pensieve.store.default_model import SHA256
from pensieve.store.store import ModelDefaults, ModelStore
from tests.store.fake_hub import FakeHub, HubRepo
from tests.store.gguf_variants import VARIANTS, layout_of, write_variant
from tests.support.server import MODEL, Server, start_server, stop_server, wait_for

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "Say hi."}]


def resident(server: Server) -> list[str]:
    return [m["name"] for m in httpx.get(f"{server.base_url}/api/ps", timeout=10).json()["models"]]


def chat(server: Server, model: str) -> str:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=HI, max_tokens=4,
                                           temperature=0)
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def hub(default_model: Path) -> Iterator[FakeHub]:
    fake = FakeHub(files={"smol.gguf": default_model}).start()
    fake.repos["test-owner/SmolLM2-GGUF"] = HubRepo({"SmolLM2.Q4_1.gguf": default_model})
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def store_server(default_model: Path, hub: FakeHub,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose store holds a copy of the default model and every corrupt variant, and
    which may pull from the loopback hub (--pull-allow 127.0.0.1)."""
    tmp = tmp_path_factory.mktemp("store-server")
    store = ModelStore(tmp / "data" / "models")
    store.import_file(default_model, "copy-a", link=True)
    store.import_file(default_model, "brief", link=True,
                      defaults=ModelDefaults(num_predict=3, temperature=0.0, system="Be brief."))
    layout = layout_of(default_model)
    for variant in VARIANTS:
        _plant_broken(store, write_variant(variant, layout, tmp / f"{variant.name}.gguf"),
                      f"bad/{variant.name}")
    old = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_TOKEN")}
    os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_e2e")
    try:
        server = start_server(tmp, "--parallel", "2", "--ctx-size", "2048",
                              "--keep-alive", "2s", "--pull-allow", "127.0.0.1",
                              data_dir=tmp / "data")
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.update({key: value})
    yield server
    stop_server(server)


def _plant_broken(store: ModelStore, path: Path, name: str) -> None:
    """A blob that got corrupted after it was stored (or was put there by hand): the store's
    checks on write never saw it, so the checks on load must refuse it."""
    from pensieve.store.names import parse_name
    from pensieve.store.store import Manifest, sha256_file

    digest = sha256_file(path)
    store.blobs.mkdir(parents=True, exist_ok=True)
    os.replace(path, store.blob_path(digest))
    store.write_manifest(Manifest(parse_name(name), digest, store.blob_path(digest).stat().st_size,
                                  "test"))


@pytest.fixture(scope="module")
def ollama_client(store_server: Server) -> ollama.Client:
    return ollama.Client(host=store_server.base_url, timeout=120)


def test_list_and_show_with_the_ollama_client(ollama_client: ollama.Client) -> None:
    names = {m.model for m in ollama_client.list().models}
    assert {MODEL, "copy-a:latest"} <= names
    assert not any(n.startswith("bad/") for n in names)  # broken files are not offered
    shown = ollama_client.show("copy-a")
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert shown.details.parameter_size == "135M" and shown.license == "apache-2.0"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in (shown.template or "")


def test_copy_and_delete_with_the_ollama_client(ollama_client: ollama.Client,
                                                store_server: Server) -> None:
    ollama_client.copy("copy-a", "team/copy-b:v2")
    assert "team/copy-b:v2" in {m.model for m in ollama_client.list().models}
    assert chat(store_server, "team/copy-b:v2")
    ollama_client.delete("team/copy-b:v2")
    assert "team/copy-b:v2" not in {m.model for m in ollama_client.list().models}
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.delete("team/copy-b:v2")
    assert caught.value.status_code == 404


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", "a/../b", "x:../../y", "a\\b"])
def test_traversal_names_are_refused_over_http(store_server: Server, name: str) -> None:
    base = store_server.base_url
    for method, path, body in [("POST", "/api/show", {"model": name}),
                               ("DELETE", "/api/delete", {"model": name}),
                               ("POST", "/api/copy", {"source": "copy-a", "destination": name}),
                               ("POST", "/api/pull", {"model": name, "stream": False})]:
        r = httpx.request(method, base + path, json=body, timeout=30)
        assert r.status_code in (400, 404), (path, r.text)
        assert isinstance(r.json()["error"], str)  # Ollama's error shape
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": name, "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_pull_a_url_into_the_running_server(ollama_client: ollama.Client, hub: FakeHub,
                                            store_server: Server) -> None:
    events = list(ollama_client.pull(f"{hub.url}/files/smol.gguf#sha256={SHA256}",
                                     stream=True))
    assert events[-1].status == "success"
    progress = [e for e in events if e.completed is not None]
    assert progress and progress[-1].completed == progress[-1].total > 90 << 20
    assert [e.completed for e in progress] == sorted(e.completed for e in progress)
    assert "smol:latest" in {m.model for m in ollama_client.list().models}
    assert chat(store_server, "smol")


def test_a_pull_from_inside_the_network_needs_pull_allow(server: Server, store_server: Server,
                                                         hub: FakeHub) -> None:
    """`server` runs without pull_allow: a URL on loopback is a 400 naming the setting, streamed
    or not, and nothing reaches the hub. `store_server` has the setting: the same pull works."""
    hub.files["inside.gguf"] = hub.files["smol.gguf"]
    url = f"http://127.0.0.1:{hub.port}/files/inside.gguf"
    before = len(hub.requests)
    for stream in (False, True):
        r = httpx.post(f"{server.base_url}/api/pull", json={"model": url, "stream": stream},
                       timeout=30)
        assert r.status_code == 400, r.text
        assert "127.0.0.1 is a loopback address" in r.json()["error"]
        assert "pull_allow" in r.json()["error"]
    with pytest.raises(ollama.ResponseError, match="pull_allow") as caught:
        ollama.Client(host=server.base_url, timeout=30).pull(url)
    assert caught.value.status_code == 400
    assert len(hub.requests) == before
    r = httpx.post(f"{store_server.base_url}/api/pull", json={"model": url, "stream": False},
                   timeout=300)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    assert [path for path, _ in hub.requests[before:]] == ["/files/inside.gguf"]
    assert "inside:latest" in {m["name"] for m in httpx.get(
        f"{store_server.base_url}/api/tags", timeout=10).json()["models"]}


def test_pull_from_the_hugging_face_stand_in(ollama_client: ollama.Client, hub: FakeHub,
                                             store_server: Server) -> None:
    reply = ollama_client.pull("hf.co/test-owner/SmolLM2-GGUF:Q4_1")
    assert reply.status == "success"
    assert "hf.co/test-owner/smollm2-gguf:q4_1" in {m.model for m in ollama_client.list().models}
    seen = [h.get("authorization") for p, h in hub.requests if "SmolLM2-GGUF" in p]
    assert seen and all(a == "Bearer hf_e2e" for a in seen)


def test_a_corrupted_pull_is_refused(ollama_client: ollama.Client, hub: FakeHub) -> None:
    with pytest.raises(ollama.ResponseError, match="sha256 mismatch"):
        ollama_client.pull(f"{hub.url}/files/smol.gguf#sha256={'0' * 64}")
    assert "smol-bad:latest" not in {m.model for m in ollama_client.list().models}


def test_every_corrupt_model_is_refused_while_the_server_keeps_serving(
        store_server: Server) -> None:
    pid = store_server.model_status()["pid"]
    for variant in VARIANTS:
        r = httpx.post(f"{store_server.base_url}/v1/chat/completions",
                       json={"model": f"bad/{variant.name}", "messages": HI, "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 400, (variant.name, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_model_file"
        assert variant.expect in error["message"], (variant.name, error["message"])
    assert chat(store_server, MODEL)
    assert store_server.model_status()["pid"] == pid  # never restarted, never crashed


def test_keep_alive_unloads_an_idle_model(store_server: Server) -> None:
    assert chat(store_server, "copy-a")
    rows = {m["name"]: m for m in httpx.get(f"{store_server.base_url}/api/ps").json()["models"]}
    assert rows["copy-a:latest"]["load_seconds"] > 0
    assert rows["copy-a:latest"]["resident_bytes"] > 50 << 20
    ps = subprocess.run([sys.executable, "-m", "pensieve.cli", "ps", "--url",
                         store_server.base_url], capture_output=True, text=True, timeout=60)
    assert ps.returncode == 0 and "copy-a:latest" in ps.stdout and " s " in ps.stdout
    assert "MiB" in ps.stdout and "forever" in ps.stdout  # the startup model never expires
    wait_for(lambda: "copy-a:latest" not in resident(store_server), timeout=15)
    assert MODEL in resident(store_server)  # the model the server was started with stays


def test_the_budget_unloads_the_least_recently_used_model(
        default_model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data" / "models")
    for name in ("copy-a", "copy-b"):
        store.import_file(default_model, name, link=True)
    # each model: 94 MiB of weights + 45 MiB of KV for 2048 tokens; room for two, not three
    server = start_server(tmp_path, "--parallel", "2", "--ctx-size", "2048",
                          "--max-memory-mb", "320", "--keep-alive", "-1",
                          data_dir=tmp_path / "data")
    try:
        assert chat(server, "copy-a") and set(resident(server)) == {MODEL, "copy-a:latest"}
        assert chat(server, MODEL)  # copy-a is now the least recently used
        assert chat(server, "copy-b")
        assert set(resident(server)) == {MODEL, "copy-b:latest"}
        assert "unloaded copy-a:latest (least recently used)" in server.log_tail(200)
    finally:
        stop_server(server)


def test_a_request_keep_alive_of_zero_unloads_after_it(store_server: Server) -> None:
    client = OpenAI(base_url=f"{store_server.base_url}/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="copy-a", messages=HI, max_tokens=2,
                                   extra_body={"keep_alive": 0})
    wait_for(lambda: "copy-a:latest" not in resident(store_server), timeout=5)
    # the next request without keep_alive gets the default (2s) back, and is never cut short
    # by the unload the previous one asked for
    for _ in range(3):
        assert chat(store_server, "copy-a")
    assert "copy-a:latest" in resident(store_server)
    r = httpx.post(f"{store_server.base_url}/v1/chat/completions",
                   json={"model": "copy-a", "messages": HI, "keep_alive": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"


def test_a_models_defaults_fill_what_the_request_leaves_out(store_server: Server) -> None:
    client = OpenAI(base_url=f"{store_server.base_url}/v1", api_key="x", max_retries=0)
    brief = client.chat.completions.create(model="brief", messages=HI)
    assert brief.usage.completion_tokens == 3 and brief.choices[0].finish_reason == "length"
    longer = client.chat.completions.create(model="brief", messages=HI, max_tokens=5)
    assert longer.usage.completion_tokens == 5
    plain = client.chat.completions.create(model="copy-a", messages=HI, max_tokens=1)
    # "Be brief." replaces the template's own default system prompt ...
    assert brief.usage.prompt_tokens < plain.usage.prompt_tokens
    own = [{"role": "system", "content": "You answer."}, *HI]
    # ... unless the conversation brings its own
    assert client.chat.completions.create(model="brief", messages=own).usage.prompt_tokens == \
        client.chat.completions.create(model="copy-a", messages=own,
                                       max_tokens=1).usage.prompt_tokens


def test_keep_alive_works_through_the_ollama_api(
        store_server: Server) -> None:
    oc = ollama.Client(host=store_server.base_url, timeout=120)
    oc.chat(model="copy-a", messages=HI, options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: "copy-a:latest" not in resident(store_server), timeout=5)
    assert oc.chat(model="copy-a", messages=HI, options={"num_predict": 2}).done
    assert "copy-a:latest" in resident(store_server)  # loaded again, with the default back
    with pytest.raises(ollama.ResponseError) as err:
        oc.generate(model="copy-a", prompt="Hi", keep_alive="soon")
    assert err.value.status_code == 400 and "keep_alive" in err.value.error


def test_create_a_model_from_another_with_the_ollama_client(ollama_client: ollama.Client,
                                                             store_server: Server) -> None:
    progress = list(ollama_client.create(
        model="pirate", from_="copy-a", system="Answer like a pirate.",
        parameters={"num_predict": 2, "temperature": 0, "stop": ["\n\n"]}, stream=True))
    assert progress[-1].status == "success"
    assert "pirate:latest" in {m.model for m in ollama_client.list().models}
    shown = httpx.post(f"{store_server.base_url}/api/show", json={"model": "pirate"},
                       timeout=30).json()
    assert shown["system"] == "Answer like a pirate."
    assert "num_predict" in shown["parameters"] and "stop" in shown["parameters"]
    client = OpenAI(base_url=f"{store_server.base_url}/v1", api_key="x", max_retries=0,
                    timeout=120)
    reply = client.chat.completions.create(model="pirate", messages=HI)
    assert reply.usage.completion_tokens == 2  # num_predict from the new model
    plain = client.chat.completions.create(model="copy-a", messages=HI, max_tokens=1)
    assert reply.usage.prompt_tokens != plain.usage.prompt_tokens  # its system prompt is used
    ollama_client.delete("pirate")
    assert "copy-a:latest" in {m.model for m in ollama_client.list().models}  # base untouched


def test_create_a_model_from_an_uploaded_gguf(ollama_client: ollama.Client, store_server: Server,
                                              default_model: Path, tmp_path: Path) -> None:
    variant = tmp_path / "variant.gguf"  # the default model with one weight byte changed:
    data = bytearray(default_model.read_bytes())  # a valid GGUF the store does not hold yet
    data[-1] ^= 1
    variant.write_bytes(bytes(data))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_url = f"{store_server.base_url}/api/blobs/{digest}"
    assert httpx.head(blob_url, timeout=10).status_code == 404
    assert ollama_client.create_blob(variant) == digest
    assert httpx.head(blob_url, timeout=10).status_code == 200
    result = ollama_client.create(model="uploaded", files={"variant.gguf": digest},
                                  parameters={"temperature": 0})
    assert result.status == "success"
    assert ollama_client.show("uploaded").details.quantization_level == "Q4_1"
    assert chat(store_server, "uploaded")
    ollama_client.delete("uploaded")


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/api/create", {"model": "x"}, 400, "either `from`"),
    ("/api/create", {"model": "x", "from": "copy-a", "files": {"a.gguf": "sha256:" + "0" * 64}},
     400, "either `from`"),
    ("/api/create", {"model": "x", "from": "no-such-model"}, 404, "no-such-model"),
    ("/api/create", {"model": "x", "files": {"a.gguf": "sha256:" + "0" * 64}}, 400,
     "/api/blobs/sha256:"),
    ("/api/create", {"model": "x", "files": {"a.gguf": "md5:abc"}}, 400, "digest"),
    ("/api/create", {"model": "x", "from": "copy-a", "template": "{{ .System }} {{ .Prompt }}"},
     400, "not Ollama's Go templates"),
    ("/api/create", {"model": "x", "from": "copy-a", "parameters": {"mirostat_tau": 5}}, 400,
     "mirostat_tau"),
    ("/api/create", {"model": "x", "from": "copy-a", "parameters": {"temperature": "hot"}}, 400,
     "temperature"),
    ("/api/create", {"model": "x", "from": "copy-a", "quantize": "q4_K_M"}, 400, "quantize"),
    ("/api/create", {"model": "../x", "from": "copy-a"}, 400, ""),
    ("/api/blobs/sha256:" + "0" * 64, b"GGUF not really", 400, "sha256 mismatch"),
    ("/api/blobs/sha256:" + hashlib.sha256(b"not a model").hexdigest(), b"not a model", 400,
     ""),
    ("/api/blobs/not-a-digest", b"x", 400, "digest"),
], ids=["neither", "both", "unknown-base", "missing-blob", "bad-digest", "go-template",
        "unknown-parameter", "parameter-type", "quantize", "bad-name", "digest-mismatch",
        "not-a-gguf", "bad-blob-digest"])
def test_create_and_upload_refuse_clearly(store_server: Server, path: str, body: object,
                                          status: int, says: str) -> None:
    url = f"{store_server.base_url}{path}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and says in error
    assert "x:latest" not in {m["name"] for m in httpx.get(
        f"{store_server.base_url}/api/tags", timeout=10).json()["models"]}
    assert not list((store_server_data(store_server) / "partial").glob("upload-*"))


def store_server_data(server: Server) -> Path:
    return server.log_path.parent / "data" / "models"
