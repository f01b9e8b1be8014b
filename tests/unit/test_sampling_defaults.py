"""Per-model sampling defaults (GGUF `general.sampling.*`, the store entry, the request on top),
llama.cpp's DRY sampler reaching the sampler chain, and the bounds every family enforces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pensieve.api.anthropic.protocol import MessagesRequest
from pensieve.api.app import create_app
from pensieve.api.generation import GenerationRequest, Prompt
from pensieve.api.model_defaults import fill_defaults
from pensieve.api.ollama.protocol import ChatRequest
from pensieve.api.openai.protocol import ChatCompletionRequest
from pensieve.engine import llama
from pensieve.engine.types import SamplingParams
from pensieve.errors import InvalidRequest
from pensieve.runtime import ModelRuntime
from pensieve.sampling import BOUNDS, DEFAULT_DRY_SEQUENCE_BREAKERS
from pensieve.store import describe
from pensieve.store.gguf import GgufInfo
from pensieve.store.names import parse_name
from pensieve.store.store import Manifest, ModelDefaults

USER = [{"role": "user", "content": "hi"}]


def filled(request: GenerationRequest, defaults: ModelDefaults) -> SamplingParams:
    """The parameters the one generation path computes: the model's defaults for every field
    the client did not send."""
    return fill_defaults(request.params, request.sent, defaults)


def gguf_info(**metadata: object) -> GgufInfo:
    return GgufInfo("/models/m.gguf", 0, 3, 32, 0,
                    {"general.architecture": "llama", **metadata}, ())


# --- where defaults come from ----------------------------------------------------------------
def test_gguf_sampling_keys_become_defaults_by_pensieve_names() -> None:
    info = gguf_info(**{"general.sampling.temp": 0.3, "general.sampling.top_k": 20,
                        "general.sampling.top_p": 0.8, "general.sampling.min_p": 0.05,
                        "general.sampling.penalty_repeat": 1.1,
                        "general.sampling.penalty_last_n": 128,
                        "general.sampling.mirostat": 0, "general.name": "x"})
    defaults = ModelDefaults.from_gguf(info)
    assert defaults == ModelDefaults(temperature=0.3, top_k=20, top_p=0.8, min_p=0.05,
                                     repeat_penalty=1.1, repeat_last_n=128)


def test_a_gguf_default_out_of_range_is_left_out_not_fatal() -> None:
    info = gguf_info(**{"general.sampling.temp": 50.0, "general.sampling.top_k": -3,
                        "general.sampling.top_p": 0.5})
    assert ModelDefaults.from_gguf(info) == ModelDefaults(top_p=0.5)


def test_the_store_entry_overrides_the_file_and_the_request_overrides_both() -> None:
    file = ModelDefaults.from_gguf(gguf_info(**{"general.sampling.temp": 0.9,
                                                "general.sampling.top_k": 20}))
    stored = ModelDefaults(temperature=0.2, dry_multiplier=0.8)
    defaults = stored.over(file)
    assert (defaults.temperature, defaults.top_k, defaults.dry_multiplier) == (0.2, 20, 0.8)
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "temperature": 0.6, "dry_multiplier": 0.0})
    params = filled(body.to_generate(), defaults)
    assert (params.temperature, params.top_k, params.dry_multiplier) == (0.6, 20, 0.0)
    unset = ChatCompletionRequest.model_validate({"model": "m", "messages": USER})
    params = filled(unset.to_generate(), defaults)
    assert (params.temperature, params.top_k, params.dry_multiplier) == (0.2, 20, 0.8)


def test_ollama_options_and_anthropic_bodies_take_the_defaults_too() -> None:
    defaults = ModelDefaults(temperature=0.2, top_p=0.9, min_p=0.1, dry_multiplier=0.8,
                             dry_sequence_breakers=("\n",), num_predict=50, stop=("END",))
    chat = ChatRequest.model_validate({"model": "m", "messages": USER,
                                       "options": {"top_p": 0.5}})
    p = filled(chat.to_generate(Prompt(text="hi"), 2048, "t-"), defaults)
    assert (p.temperature, p.top_p, p.min_p, p.dry_multiplier) == (0.2, 0.5, 0.1, 0.8)
    assert (p.dry_sequence_breakers, p.max_tokens, p.stop) == (("\n",), 50, ("END",))
    msg = MessagesRequest.model_validate({"model": "m", "max_tokens": 9, "messages": USER,
                                          "temperature": 1.0, "stop_sequences": ["x"]})
    p = filled(msg.to_generate(), defaults)
    assert (p.temperature, p.top_p, p.min_p, p.dry_multiplier) == (1.0, 0.9, 0.1, 0.8)
    assert (p.max_tokens, p.stop) == (9, ("x",))  # Anthropic's max_tokens is always sent


def test_show_lists_the_merged_defaults() -> None:
    info = gguf_info(**{"general.sampling.top_k": 20})
    manifest = Manifest(parse_name("m"), "0" * 64, 1, "test",
                        defaults=ModelDefaults(temperature=0.2, dry_multiplier=0.8))
    defaults = describe.model_defaults(manifest, info)
    text = describe.parameters_text(defaults)
    assert "temperature     0.2" in text and "top_k           20" in text
    assert "dry_multiplier  0.8" in text
    assert "PARAMETER dry_multiplier  0.8" in describe.modelfile("m", defaults, info)


def test_the_embedded_model_gets_its_recommended_defaults(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from pensieve.cli import serve as server
    from pensieve.store import default_model
    from pensieve.store.store import ModelStore

    blob = tmp_path / "m.gguf"
    blob.write_bytes(b"model")
    store = ModelStore(tmp_path / "models")
    monkeypatch.setattr(store, "add_file", lambda *_a, **_k: ("a" * 64, 5))
    monkeypatch.setattr(store, "write_manifest", lambda m: written.append(m))
    written: list[Manifest] = []
    got = server._register_default_model(store, blob, "smol")
    assert got == default_model.RECOMMENDED_DEFAULTS != ModelDefaults()
    assert written[0].defaults == default_model.RECOMMENDED_DEFAULTS


@pytest.mark.parametrize("bad", [{"dry_multiplier": 9.0}, {"dry_base": 0.5},
                                 {"dry_allowed_length": 0}, {"dry_penalty_last_n": -2},
                                 {"dry_sequence_breakers": [""]}, {"repeat_last_n": 1.5},
                                 {"dry_sequence_breakers": "x" * 41}])
def test_bad_model_defaults_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        ModelDefaults.from_dict(bad)


def test_model_defaults_round_trip_through_the_manifest() -> None:
    defaults = ModelDefaults(temperature=0.2, dry_multiplier=0.8, dry_penalty_last_n=-1,
                             dry_sequence_breakers=("\n", ":"), repeat_last_n=64)
    manifest = Manifest(parse_name("m"), "0" * 64, 1, "test", defaults=defaults)
    assert Manifest.from_json(manifest.to_json()).defaults == defaults


# --- DRY reaching the sampler chain ----------------------------------------------------------
class _FakeModel:
    vocab = object()
    n_vocab = 10
    eog_ids: frozenset[int] = frozenset()

    def n_ctx_train(self) -> int:
        return 8192


def _stages(monkeypatch: pytest.MonkeyPatch, params: SamplingParams) -> list[Any]:
    """The chain's stages, each recorded as (constructor name, its arguments)."""
    for name in dir(llama.C):
        if name.startswith("llama_sampler_init_"):
            monkeypatch.setattr(llama.C, name, lambda *a, _n=name: (_n, a))
    return llama._sampler_stages(_FakeModel(), params, seed=7)  # type: ignore[arg-type]


def test_dry_params_reach_the_sampler_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    params = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "temperature": 0.5, "dry_multiplier": 0.8,
         "dry_base": 2.0, "dry_allowed_length": 3, "dry_penalty_last_n": 256,
         "dry_sequence_breakers": ["\n", "::"]}).to_generate().params
    stages = _stages(monkeypatch, params)
    names = [s[0] for s in stages]
    assert names == ["llama_sampler_init_dry", "llama_sampler_init_temp",
                     "llama_sampler_init_dist"]
    _vocab, mult, base, allowed, last_n, breakers, num = stages[0][1]
    assert (mult, base, allowed, last_n, num) == (0.8, 2.0, 3, 256, 2)
    assert [breakers[i] for i in range(num)] == [b"\n", b"::"]


def test_dry_whole_context_and_default_breakers_and_greedy(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    params = ollama_params({"temperature": 0, "dry_multiplier": 1.0, "dry_penalty_last_n": -1})
    stages = _stages(monkeypatch, params)
    assert [s[0] for s in stages] == ["llama_sampler_init_dry", "llama_sampler_init_greedy"]
    _vocab, _mult, base, allowed, last_n, breakers, num = stages[0][1]
    assert (base, allowed, last_n) == (1.75, 2, 8192)  # llama-server's defaults; -1: context
    assert tuple(breakers[i].decode() for i in range(num)) == DEFAULT_DRY_SEQUENCE_BREAKERS


def test_no_dry_stage_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for params in (SamplingParams(), SamplingParams(dry_multiplier=0.8, dry_penalty_last_n=0)):
        assert "llama_sampler_init_dry" not in [s[0] for s in _stages(monkeypatch, params)]


def ollama_params(options: dict[str, object]) -> SamplingParams:
    chat = ChatRequest.model_validate({"model": "m", "messages": USER, "options": options})
    return chat.options.to_sampling_params(4096)


def test_repeat_last_n_minus_one_is_the_whole_context(monkeypatch: pytest.MonkeyPatch) -> None:
    params = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "repeat_penalty": 1.2, "repeat_last_n": -1}
    ).to_generate().params
    assert params.penalty_last_n is None
    stage = [s for s in _stages(monkeypatch, params) if s[0] == "llama_sampler_init_penalties"]
    assert stage[0][1][1] == 8192


# --- bounds: one table, a 400 in each family's shape ------------------------------------------
@pytest.fixture(scope="module")
def http() -> TestClient:
    return TestClient(create_app(ModelRuntime()), base_url="http://127.0.0.1:8080",
                      raise_server_exceptions=False)


BAD_DRY = {"dry_multiplier": BOUNDS["dry_multiplier"].high + 1}


@pytest.mark.parametrize("bad", [BAD_DRY, {"dry_base": 0.5}, {"dry_allowed_length": "2"},
                                 {"dry_sequence_breakers": ["x" * 41]}])
def test_out_of_range_dry_is_a_400_in_each_family_shape(http: TestClient,
                                                        bad: dict[str, object]) -> None:
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": USER, **bad})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/api/chat", json={"model": "m", "messages": USER, "options": bad})
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and "dry" in r.json()["error"]
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 4, "messages": USER, **bad})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_bounds_table_is_what_the_request_models_enforce() -> None:
    limits = ChatCompletionRequest.model_json_schema()["properties"]
    for name in ("temperature", "top_p", "min_p", "repeat_penalty", "dry_multiplier",
                 "dry_base", "dry_allowed_length", "dry_penalty_last_n", "repeat_last_n"):
        schema = next(s for s in limits[name]["anyOf"] if s["type"] != "null")
        bound = BOUNDS[name]
        low_key = "exclusiveMinimum" if bound.low_open else "minimum"
        assert (schema[low_key], schema["maximum"]) == (bound.low, bound.high), name
