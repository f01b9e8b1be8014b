"""The OpenAI API, driven by the official `openai` client against the real server and model."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.server import MODEL, Server, assert_same_greedy_run, completion_entries

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


def chat(client: OpenAI, **kwargs):
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 24, "temperature": 0}
    return client.chat.completions.create(**{**args, **kwargs})


def stream_text(client: OpenAI, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_lists_the_default_model(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_answers_with_text_and_usage(client: OpenAI) -> None:
    r = chat(client)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.message.content.strip()) > 0
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_max_tokens_limits_the_answer_and_reports_length(client: OpenAI) -> None:
    r = chat(client, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"
    r2 = chat(client, max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 5


def test_streamed_text_equals_non_streamed_text_at_temperature_0(exact_client: OpenAI) -> None:
    client = exact_client  # two runs compared exactly: a server without memory
    full = chat(client, max_tokens=40).choices[0].message.content
    streamed, chunks = stream_text(client, max_tokens=40)
    assert streamed == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_include_usage_sends_a_final_usage_chunk(client: OpenAI) -> None:
    _, chunks = stream_text(client, max_tokens=8, stream_options={"include_usage": True},
                            extra_body={"ignore_eos": True})
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_is_never_in_the_output_streamed_or_not(exact_client: OpenAI) -> None:
    client = exact_client  # two runs compared exactly: a server without memory
    base = chat(client, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    words = base.split()
    assert len(words) > 4, base
    stop = " " + words[3]  # a string the model is known to produce at temperature 0
    cut = base[: base.index(stop)]
    r = chat(client, max_tokens=40, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed, chunks = stream_text(client, max_tokens=40, stop=stop,
                                   extra_body={"ignore_eos": True})
    assert streamed == cut
    assert stop not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_seed_makes_sampling_reproducible(exact_client: OpenAI) -> None:
    client = exact_client  # the same logits each time: a server without memory
    args = {"temperature": 1.0, "max_tokens": 30, "extra_body": {"ignore_eos": True}}
    a = chat(client, seed=1234, **args).choices[0].message.content
    b = chat(client, seed=1234, **args).choices[0].message.content
    others = {chat(client, seed=s, **args).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1, "different seeds should give different samples"


def test_n_gives_several_choices(client: OpenAI) -> None:
    r = chat(client, n=3, temperature=1.0, seed=7, max_tokens=20,
             extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 60
    assert len({c.message.content for c in r.choices}) > 1
    greedy = chat(client, n=2, max_tokens=12, logprobs=True, top_logprobs=5)
    # the choices decode side by side, each in its own KV cells: equal up to a near-tie
    assert_same_greedy_run(greedy.choices[0].logprobs.content, greedy.choices[1].logprobs.content)
    alone = chat(client, max_tokens=12, logprobs=True, top_logprobs=5).choices[0]
    # one sequence alone vs two decoding together, in other KV cells: equal up to a near-tie
    assert_same_greedy_run(greedy.choices[0].logprobs.content, alone.logprobs.content)


def test_n_streamed_covers_every_choice(client: OpenAI) -> None:
    _, chunks = stream_text(client, n=2, max_tokens=6, extra_body={"ignore_eos": True})
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_completions_endpoint_streamed_and_not(exact_client: OpenAI) -> None:
    client = exact_client  # two runs compared exactly: a server without memory
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert text and r.usage.completion_tokens <= 12
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text.startswith(prompt)


def test_completions_accepts_token_ids_and_several_prompts(client: OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=[[504, 3575, 282], [19556]], max_tokens=4,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == 4
    assert r.usage.completion_tokens == 8
    texts = client.completions.create(model=MODEL, prompt=["Hello", "The sky is"], max_tokens=3,
                                      n=2, temperature=0, logprobs=5,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    hello, sky = texts.choices[:2], texts.choices[2:]
    for pair in (hello, sky):  # each prompt's two choices: equal up to a near-tie
        assert_same_greedy_run(*(completion_entries(c.logprobs) for c in pair))
    assert hello[0].logprobs.tokens != sky[0].logprobs.tokens


def test_logprobs_of_chosen_token_match_top_1_at_temperature_0(client: OpenAI) -> None:
    r = chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)


@pytest.mark.parametrize("text", ["Hello, wörld! 🎉 Grüße", "<|im_start|>user\nHi<|im_end|>"])
def test_detokenize_gives_back_what_tokenize_took(server: Server, text: str) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"content": text},
                        timeout=30).json()["tokens"]
    assert len(tokens) > 3
    r = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens}, timeout=30)
    assert r.status_code == 200 and r.json() == {"content": text}
    empty = httpx.post(f"{server.base_url}/detokenize", json={"tokens": []}, timeout=30)
    assert empty.json() == {"content": ""}


def test_logit_bias_bans_a_token(client: OpenAI, server: Server) -> None:
    first = chat(client, max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    r = httpx.post(f"{server.base_url}/tokenize", json={"content": first.token}, timeout=30)
    ids = r.json()["tokens"]
    assert len(ids) == 1, ids
    banned = chat(client, max_tokens=1, logprobs=True, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token
    forced = chat(client, max_tokens=1, logprobs=True, logit_bias={str(ids[0]): 100})
    assert forced.choices[0].logprobs.content[0].token == first.token


def test_many_requests_at_once_all_complete(client: OpenAI) -> None:
    def one(i: int) -> int:
        r = chat(client, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=16,
                 extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    with ThreadPoolExecutor(max_workers=24) as pool:
        counts = list(pool.map(one, range(24)))
    assert counts == [16] * 24


def test_output_alone_matches_output_inside_a_batch_of_8(client: OpenAI) -> None:
    prompts = [f"Describe the color number {i} in one sentence." for i in range(8)]

    def run(p: str):
        msgs = [{"role": "user", "content": p}]
        r = chat(client, messages=msgs, max_tokens=32, logprobs=True, top_logprobs=5)
        return r.choices[0].logprobs.content

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        batched = list(pool.map(run, prompts))
    for a, b in zip(alone, batched, strict=True):
        assert_same_greedy_run(a, b)


def test_unknown_model_is_a_404_in_openai_shape(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, model="no-such-model")
    err = info.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert MODEL in err["message"]


def test_prompt_longer_than_context_is_a_400_that_says_both_lengths(client: OpenAI) -> None:
    long_text = "hello " * 9000
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=[{"role": "user", "content": long_text}])
    message = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in message
    match = re.search(r"prompt is (\d+) tokens", message)
    assert match and int(match.group(1)) > 9000


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 10**30}, "n"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50,
      "logprobs": True}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "logit_bias": {"abc": 1}}, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_bad_requests_get_a_400_in_openai_shape(server: Server, body: dict, param) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


@pytest.mark.parametrize("extra,param", [
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"-5": 5}}, "logit_bias"),
    ({"n": 9}, "n"),  # the test server runs --parallel 8
])
def test_requests_the_model_cannot_serve_get_a_400(server: Server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **extra}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    plain = {k: v for k, v in body.items() if k not in extra}
    ok = httpx.post(f"{server.base_url}/v1/chat/completions", json=plain, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_is_a_400(server: Server) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=b'{"model": ',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored(client: OpenAI) -> None:
    r = chat(client, max_tokens=2, extra_body={"some_future_field": {"x": 1}})
    assert r.choices[0].message.content is not None


def test_image_content_is_refused_for_a_text_only_model(client: OpenAI) -> None:
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=msgs)
    assert "text-only" in info.value.body["message"]


def test_a_follow_up_turn_reuses_the_conversation_kv_and_answers_the_same(client: OpenAI) -> None:
    system = {"role": "system", "content": "You are a terse assistant who answers in one line."}
    turn1 = [system, {"role": "user", "content": "Name a large ocean."}]
    first = chat(client, messages=turn1, max_tokens=16)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And a small sea?"}]
    cached = chat(client, messages=turn2, max_tokens=16, logprobs=True, top_logprobs=5)
    fresh = chat(client, messages=turn2, max_tokens=16, logprobs=True, top_logprobs=5,
                 extra_body={"cache_prompt": False})
    assert cached.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert cached.usage.prompt_tokens == fresh.usage.prompt_tokens
    # the prefix's KV was computed along another path (turn 1's prefill and decode, not one
    # prompt batch): equal up to a near-tie (this one's first token: 0.17 nats apart)
    assert_same_greedy_run(cached.choices[0].logprobs.content, fresh.choices[0].logprobs.content)
