"""Tools and thinking on Ollama's /api/chat, and /api/show capabilities, driven by the official
`ollama` client against the real model, served under a Hermes-style template (native
`<tool_call>` output, `enable_thinking`) and under its own template (the generic convention).

Ollama has no tool_choice: the model may call a tool or answer. A conversation that already
holds a call in Ollama's shape (arguments as an object) for the same kind of question leads the
small model to call again: under the generic convention after the call's result (a `tool`
message naming its tool); under Hermes right after the call (there, a result in the history
leads it to copy the `<tool_response>` instead)."""

from __future__ import annotations

import ollama
import pytest

from tests.support.server import MODEL, Server
from tests.support.templates import WEATHER

pytestmark = pytest.mark.e2e

HERMES_MODEL = "hermes-tools"
MODELS = {"hermes": HERMES_MODEL, "generic": MODEL}
TOOLS = [{"type": "function", "function": WEATHER}]
GREEDY = {"temperature": 0, "num_predict": 120}
ASK_PARIS = {"role": "user", "content": "What is the weather in Paris?"}
ASK_ROME = {"role": "user", "content": "What is the weather in Rome?"}
CALL_PARIS = {"role": "assistant", "content": "",
              "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
HISTORIES = {
    "hermes": [ASK_PARIS, CALL_PARIS, ASK_ROME],
    "generic": [ASK_PARIS, CALL_PARIS,
                {"role": "tool", "tool_name": "get_weather", "content": '{"temperature_c": 18}'},
                ASK_ROME],
}


@pytest.fixture(scope="module")
def srv(exact_server: Server) -> Server:
    return exact_server  # serves HERMES_MODEL too


@pytest.fixture(scope="module")
def oc(srv: Server) -> ollama.Client:
    return ollama.Client(host=srv.base_url, timeout=120)


@pytest.mark.parametrize("fmt", ["hermes", "generic"])
def test_tool_calls_come_as_objects_streamed_and_not(oc: ollama.Client, fmt: str) -> None:
    history = HISTORIES[fmt]
    whole = oc.chat(model=MODELS[fmt], messages=history, tools=TOOLS, options=GREEDY)
    calls = whole.message.tool_calls
    assert calls, whole.message.content
    assert calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments["city"], str)
    assert whole.done_reason == "stop"
    assert "<tool_call>" not in whole.message.content
    assert '"tool_calls"' not in whole.message.content

    parts = list(oc.chat(model=MODELS[fmt], messages=history, tools=TOOLS, options=GREEDY,
                         stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert with_calls and not with_calls[0].done  # a call goes out when it is complete
    streamed = [c for p in with_calls for c in p.message.tool_calls]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == \
        [(c.function.name, dict(c.function.arguments)) for c in calls]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_think_gives_message_thinking_never_content(oc: ollama.Client) -> None:
    ask = [{"role": "user", "content": "Is 17 a prime number?"}]
    whole = oc.chat(model=HERMES_MODEL, messages=ask, think=True, options=GREEDY)
    assert whole.message.thinking and whole.message.thinking.strip()
    assert "<think>" not in whole.message.content and "</think>" not in whole.message.content
    parts = list(oc.chat(model=HERMES_MODEL, messages=ask, think=True, options=GREEDY,
                         stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == whole.message.thinking
    assert "".join(p.message.content for p in parts) == whole.message.content
    g = oc.generate(model=HERMES_MODEL, prompt="Is 17 a prime number?", think=True,
                    options=GREEDY)
    assert g.thinking == whole.message.thinking and "<think>" not in g.response


def test_show_lists_what_each_model_can_do(oc: ollama.Client) -> None:
    plain = oc.show(MODEL).capabilities or []
    hermes = oc.show(HERMES_MODEL).capabilities or []
    assert {"completion", "tools"} <= set(plain) and "thinking" not in plain
    assert {"completion", "tools", "thinking"} <= set(hermes)
    assert "embedding" not in plain + hermes
    with pytest.raises(ollama.ResponseError) as err:
        oc.chat(model=MODEL, messages=[ASK_PARIS], think=True)
    assert err.value.status_code == 400 and "thinking" in err.value.error


def test_a_tool_with_an_invalid_schema_is_a_400_naming_it(oc: ollama.Client) -> None:
    # (the client itself checks the top level; a property's type it takes as any string)
    schema = {"type": "object", "properties": {"city": {"type": "strin"}}}
    bad = [{"type": "function", "function": {**WEATHER, "parameters": schema}}]
    with pytest.raises(ollama.ResponseError) as err:
        oc.chat(model=MODEL, messages=[ASK_PARIS], tools=bad)
    assert err.value.status_code == 400 and "get_weather" in err.value.error
