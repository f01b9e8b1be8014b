"""Embeddings through the official `openai` client (and Ollama's routes over HTTP)."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.support.server import MODEL, Server

pytestmark = pytest.mark.e2e

CAT = "The cat sat on the warm windowsill, purring in the sun."
KITTEN = "A kitten was lying on the sunny window ledge, purring happily."
TAXES = "Quarterly corporate tax filings are due before the end of the fiscal year."


def _vectors(client: OpenAI, inputs, **kwargs) -> np.ndarray:
    r = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float", **kwargs)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return np.array([d.embedding for d in r.data])


def test_embeddings_are_deterministic_normalized_and_similar_texts_closer(client: OpenAI) -> None:
    a = _vectors(client, [CAT, KITTEN, TAXES])
    b = _vectors(client, [TAXES, CAT])
    assert a.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(b[1], a[0], atol=1e-5)  # same text, other batch position
    np.testing.assert_allclose(b[0], a[2], atol=1e-5)
    assert a[0] @ a[1] > a[0] @ a[2]
    assert a[0] @ a[1] > a[1] @ a[2]


def test_base64_matches_float_and_usage_counts_tokens(client: OpenAI) -> None:
    floats = _vectors(client, CAT)[0]
    raw = client.embeddings.create(model=MODEL, input=CAT, encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
    # without encoding_format the client asks for base64 and decodes it itself
    r = client.embeddings.create(model=MODEL, input=CAT)
    np.testing.assert_allclose(np.array(r.data[0].embedding), floats, atol=1e-6)
    assert r.usage.prompt_tokens == raw.usage.prompt_tokens > 5


def test_token_array_inputs_equal_their_text(client: OpenAI, server: Server) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize",
                        json={"content": CAT, "add_special": True}).json()["tokens"]
    by_text = _vectors(client, CAT)[0]
    one = _vectors(client, tokens)[0]
    many = _vectors(client, [tokens, tokens[:5]])
    np.testing.assert_allclose(one, by_text, atol=1e-5)
    np.testing.assert_allclose(many[0], by_text, atol=1e-5)


def test_concurrent_requests_are_batched_and_agree(client: OpenAI) -> None:
    texts = [f"Sentence number {i} about gardens." for i in range(12)]
    alone = _vectors(client, texts)
    with ThreadPoolExecutor(6) as pool:
        each = list(pool.map(lambda t: _vectors(client, t)[0], texts))
    # llama.cpp's CPU kernels round differently for other batch shapes (docs/memory.md,
    # Determinism): the same text in another batch is the same direction, not the same bits
    cosines = np.sum(np.array(each) * alone, axis=1)
    assert cosines.min() > 0.999, cosines


@pytest.mark.parametrize("kwargs", [{"input": ""}, {"input": []}, {"input": [[]]},
                                    {"input": [10**9]}, {"input": "x", "dimensions": 64},
                                    {"input": 5}])
def test_bad_embedding_input_is_a_400(client: OpenAI, kwargs: dict) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, encoding_format="float", **kwargs)


def test_ollama_embed_routes(client: OpenAI, server: Server) -> None:
    expected = _vectors(client, [CAT, TAXES])
    r = httpx.post(f"{server.base_url}/api/embed", json={"model": MODEL, "input": [CAT, TAXES]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == MODEL and body["prompt_eval_count"] > 10
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    single = httpx.post(f"{server.base_url}/api/embeddings", json={"model": MODEL,
                                                                  "prompt": CAT}).json()
    np.testing.assert_allclose(single["embedding"], expected[0], atol=1e-5)
    bad = httpx.post(f"{server.base_url}/api/embed", json={"model": MODEL, "input": 3})
    assert bad.status_code == 400 and "error" in bad.json()
    long = httpx.post(f"{server.base_url}/api/embed",
                      json={"model": MODEL, "input": "word " * 5000, "truncate": False})
    assert long.status_code == 400 and "error" in long.json()
