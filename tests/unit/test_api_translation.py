"""The edge translations of the Ollama and Anthropic APIs, without a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pensieve.api.anthropic.protocol import MessagesRequest
from pensieve.api.generation import ResponseFormat, Timings, Turn
from pensieve.api.ollama.capabilities import fim_token_ids
from pensieve.api.ollama.go_template import render_go_template
from pensieve.api.ollama.protocol import GenerateRequest, Options
from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.errors import InvalidRequest

CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
          "{{ .Response }}<|im_end|>")


# --- Go templates ----------------------------------------------------------------------------
def test_go_template_fills_fields_and_stops_at_the_response() -> None:
    out = render_go_template(CHATML, "Be brief.", "Hi")
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_go_template_if_else_and_trim_markers() -> None:
    source = "{{ if .System }}S={{ .System }}{{ else }}none{{ end }} \n {{- .Prompt -}} \n!"
    assert render_go_template(source, "", "p") == "nonep!"
    assert render_go_template(source, "x", "p") == "S=xp!"


def test_go_template_nested_if_respects_the_outer_condition() -> None:
    source = "{{ if .System }}{{ if .Prompt }}both{{ else }}sys{{ end }}{{ end }}."
    assert render_go_template(source, "", "p") == "."
    assert render_go_template(source, "s", "") == "sys."
    assert render_go_template(source, "s", "p") == "both."


@pytest.mark.parametrize("source", ["{{ .Messages }}", "{{ range .Messages }}{{ end }}",
                                    "{{ call .F }}", "{{ if .System }}x", "{{ end }}",
                                    '{{ printf "%s" .Prompt }}'])
def test_go_template_refuses_everything_else(source: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        render_go_template(source, "s", "p")
    assert err.value.param == "template"


# --- Ollama options --------------------------------------------------------------------------
def test_options_map_onto_sampling_params() -> None:
    p = Options.model_validate({"temperature": 0, "num_predict": 12, "top_k": 5, "top_p": 0.5,
                                "min_p": 0.1, "seed": 3, "stop": ["\n"],
                                "repeat_penalty": 1.3, "repeat_last_n": -1,
                                "presence_penalty": 0.2, "frequency_penalty": 0.4,
                                "num_thread": 4}).to_sampling_params(n_ctx=2048)
    assert (p.temperature, p.max_tokens, p.top_k, p.top_p, p.min_p) == (0, 12, 5, 0.5, 0.1)
    assert (p.seed, p.stop, p.repeat_penalty, p.penalty_last_n) == (3, ("\n",), 1.3, 2048)
    assert (p.presence_penalty, p.frequency_penalty) == (0.2, 0.4)


def test_default_options_are_ollamas_without_a_repeat_penalty() -> None:
    p = Options().to_sampling_params(n_ctx=2048)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.8, 40, 0.9, None)
    assert not p.has_penalties
    for unlimited in (-1, -2):
        assert Options(num_predict=unlimited).to_sampling_params(2048).max_tokens is None


def test_negative_seed_means_random() -> None:
    assert Options(seed=-1).to_sampling_params(2048).seed is None


def test_format_becomes_a_response_format() -> None:
    schema = {"type": "object"}
    assert GenerateRequest(model="m", format="json").response_format == ResponseFormat("json")
    assert GenerateRequest(model="m", format=schema).response_format == \
        ResponseFormat("json_schema", schema)
    assert GenerateRequest(model="m").response_format is None
    with pytest.raises(ValidationError):
        GenerateRequest(model="m", format={})


def test_fim_tokens_come_from_the_gguf_metadata() -> None:
    new = {"tokenizer.ggml.fim_pre_token_id": "1", "tokenizer.ggml.fim_suf_token_id": "2",
           "tokenizer.ggml.fim_mid_token_id": "3"}
    old = {"tokenizer.ggml.prefix_token_id": "4", "tokenizer.ggml.suffix_token_id": "5",
           "tokenizer.ggml.middle_token_id": "6"}
    assert fim_token_ids(new) == (1, 2, 3)
    assert fim_token_ids(old) == (4, 5, 6)
    assert fim_token_ids({**new, "tokenizer.ggml.fim_mid_token_id": "-1"}) is None
    assert fim_token_ids({}) is None


# --- Anthropic -------------------------------------------------------------------------------
def _messages(**body: object) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **body})


def test_system_blocks_and_same_role_turns_are_merged() -> None:
    req = _messages(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                    messages=[{"role": "user", "content": "1"},
                              {"role": "user", "content": [{"type": "text", "text": "2"}]},
                              {"role": "assistant", "content": "3"},
                              {"role": "user", "content": "4"}])
    prompt = req.prompt()
    assert prompt.messages == (Turn("system", "AB"), Turn("user", "1\n\n2"),
                               Turn("assistant", "3"), Turn("user", "4"))
    assert prompt.prefill == ""


def test_a_trailing_assistant_turn_becomes_the_prefill() -> None:
    req = _messages(messages=[{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Well, "}])
    prompt = req.to_generate().prompts[0]
    assert prompt.messages == (Turn("user", "Hi"),)
    assert prompt.prefill == "Well,"


def test_anthropic_sampling_defaults_and_values() -> None:
    p = _messages(messages=[{"role": "user", "content": "x"}], temperature=0.2, top_k=3,
                  top_p=0.7, stop_sequences=["END"]).to_generate().params
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.stop) == (8, 0.2, 3, 0.7, ("END",))
    d = _messages(messages=[{"role": "user", "content": "x"}]).to_generate().params
    assert (d.temperature, d.top_k, d.top_p, d.stop) == (1.0, 0, 1.0, ())


# --- shared pieces ---------------------------------------------------------------------------
def test_timings_split_the_request_into_load_prompt_and_eval() -> None:
    t = Timings(started_ns=100, loaded_ns=150, accepted_ns=160, first_token_ns=400,
                finished_ns=1000)
    assert (t.load_ns, t.prompt_eval_ns, t.eval_ns, t.total_ns) == (50, 250, 600, 900)


def test_detokenizer_names_the_stop_string_that_matched() -> None:
    pieces = {1: b"Hello", 2: b" wor", 3: b"ld END", 4: b"!"}
    d = IncrementalDetokenizer(pieces.__getitem__, ("END", "world"))
    sent = "".join(d.add_token(t) for t in (1, 2, 3, 4))
    assert sent == "Hello " and d.matched_stop == "world"
    plain = IncrementalDetokenizer(pieces.__getitem__, ("zzz",))
    for t in (1, 2):
        plain.add_token(t)
    assert plain.matched_stop is None


def test_output_config_format_becomes_a_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = _messages(messages=[{"role": "user", "content": "x"}],
                    output_config={"effort": "low",
                                   "format": {"type": "json_schema", "schema": schema}})
    assert req.to_generate().response_format == ResponseFormat("json_schema", schema)
    with pytest.raises(ValidationError):
        _messages(messages=[{"role": "user", "content": "x"}],
                  output_config={"format": {"type": "xml", "schema": schema}})
