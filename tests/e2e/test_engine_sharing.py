"""The engine on the real model, without HTTP: n > 1 computes the prompt once and copies its KV;
grammar-constrained sequences in one batch each follow their own grammar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pensieve.engine.config import ContextConfig, EngineConfig
from pensieve.engine.engine import Engine
from pensieve.engine.llama import init_backend
from pensieve.engine.types import EngineRequest, RequestAccepted, SamplingParams
from tests.support.server import assert_same_greedy_run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[Engine]:
    init_backend()
    ctx = ContextConfig(n_ctx=4096, n_batch=512, n_ubatch=512, n_seq_max=8, n_threads=2,
                        n_threads_batch=2, flash_attn="on", kv_unified=True)
    eng = Engine(EngineConfig(str(default_model), ctx, prefix_cache=False))
    yield eng
    eng.close()


def _run(engine: Engine, req: EngineRequest) -> tuple[int, dict[int, list[int]], dict[int, list]]:
    """Tokens put through llama_decode, and each choice's output tokens and logprobs (as the
    entries of `assert_same_greedy_run`, when asked for)."""
    assert isinstance(engine.add_request(req), RequestAccepted)
    num_decoded, outputs, logprobs = 0, {}, {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.index, []).extend(out.token_ids)
            logprobs.setdefault(out.index, []).extend(
                {"token": lp.token_id, "logprob": lp.logprob,
                 "top_logprobs": [{"token": t, "logprob": v} for t, _, v in lp.top]}
                for lp in out.logprobs or ())
        num_decoded += engine.num_batch_tokens  # the batch itself now lives in the runner
    return num_decoded, outputs, logprobs


def test_n_choices_compute_the_prompt_once(engine: Engine) -> None:
    prompt = "The history of the lighthouse, told in many words: " * 8
    num_prompt = len(engine.tokenize(prompt, True))
    params = SamplingParams(max_tokens=4, temperature=0.0, n=3, ignore_eos=True, logprobs=True,
                            top_logprobs=5)
    decoded, outputs, logprobs = _run(engine, EngineRequest("n3", params, prompt=prompt))
    assert sorted(outputs) == [0, 1, 2] and all(len(o) == 4 for o in outputs.values())
    # the prompt once, then each choice's generated tokens but its last (never fed back)
    assert decoded == num_prompt + 3 * 3
    for i in (1, 2):  # greedy from the copied KV, side by side: equal up to a near-tie
        assert_same_greedy_run(logprobs[0], logprobs[i])


def test_each_sequence_follows_its_own_grammar(engine: Engine) -> None:
    grammars = {"a": 'root ::= "yes" | "no"', "b": 'root ::= [0-9] [0-9] [0-9]'}
    for rid, grammar in grammars.items():
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, grammar=grammar)
        engine.add_request(EngineRequest(rid, params, prompt="Say something."))
    texts: dict[str, str] = {}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    assert texts["a"] in ("yes", "no")
    assert len(texts["b"]) == 3 and texts["b"].isdigit()


LAZY_PROMPT = "".join(
    f"Q: the weather in {city}?\nA: <tool_call>{{\"name\": \"get_weather\", \"arguments\": "
    f"{{\"city\": \"{city}\"}}}}</tool_call>\n" for city in ("Paris", "Oslo", "Lima", "Kyiv")
) + "Q: the weather in Rome?\nA:"


def _lazy_run(engine: Engine, rid: str, grammar: str | None,
              triggers: tuple[str, ...]) -> str:
    params = SamplingParams(max_tokens=48, temperature=0.0, grammar=grammar,
                            grammar_triggers=triggers)
    engine.add_request(EngineRequest(rid, params, prompt=LAZY_PROMPT))
    text = ""
    while engine.has_work():
        text += "".join(out.text for out in engine.step())
    return text


def test_a_lazy_grammar_holds_only_from_its_trigger(engine: Engine) -> None:
    """A tool call under `auto`: the text is free until `<tool_call>` opens, then the call
    follows the grammar (here: a tool the examples never name, so the model would not write
    it unconstrained)."""
    from pensieve.api.tool_formats import Hermes
    from pensieve.api.tools import ToolDef, ToolSpec
    free = _lazy_run(engine, "free", None, ())
    assert free.lstrip().startswith("<tool_call>")  # the model copies the examples
    spec = ToolSpec((ToolDef("lookup", "", {"type": "object",
                                             "properties": {"q": {"type": "string"}},
                                             "required": ["q"]}),))
    fmt = Hermes()
    lazy = _lazy_run(engine, "lazy", fmt.grammar(spec), fmt.triggers())
    before, _, _ = lazy.partition("<tool_call>")
    assert before == free.partition("<tool_call>")[0]  # nothing constrained before the trigger
    region = fmt.parse(lazy[len(before):])
    # (the grammar allows parallel calls, and the model goes on copying the examples' lines)
    assert {c.name for c in region.calls} == {"lookup"} and region.calls[0].complete
    assert "lookup" not in free  # the grammar, not the model, chose it
