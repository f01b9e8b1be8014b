"""The engine on the real model, without HTTP: n > 1 computes the prompt once and copies its KV;
grammar-constrained sequences in one batch each follow their own grammar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pensieve.engine.engine import Engine, EngineConfig
from pensieve.engine.llama import ContextConfig, init_backend
from pensieve.engine.types import EngineRequest, RequestAccepted, SamplingParams

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[Engine]:
    init_backend()
    ctx = ContextConfig(n_ctx=4096, n_batch=512, n_ubatch=512, n_seq_max=8, n_threads=2,
                        n_threads_batch=2, flash_attn="on", kv_unified=True)
    eng = Engine(EngineConfig(str(default_model), ctx, prefix_cache=False))
    yield eng
    eng.close()


def _run(engine: Engine, req: EngineRequest) -> tuple[int, dict[int, list[int]]]:
    """Tokens put through llama_decode, and each choice's output tokens."""
    assert isinstance(engine.add_request(req), RequestAccepted)
    num_decoded, outputs = 0, {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.index, []).extend(out.token_ids)
        num_decoded += engine.num_batch_tokens  # the batch itself now lives in the runner
    return num_decoded, outputs


def test_n_choices_compute_the_prompt_once(engine: Engine) -> None:
    prompt = "The history of the lighthouse, told in many words: " * 8
    num_prompt = len(engine.tokenize(prompt, True))
    params = SamplingParams(max_tokens=4, temperature=0.0, n=3, ignore_eos=True)
    decoded, outputs = _run(engine, EngineRequest("n3", params, prompt=prompt))
    assert sorted(outputs) == [0, 1, 2] and all(len(o) == 4 for o in outputs.values())
    # the prompt once, then each choice's generated tokens but its last (never fed back)
    assert decoded == num_prompt + 3 * 3
    assert outputs[0] == outputs[1] == outputs[2]  # greedy: the copied KV gives the same text


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
