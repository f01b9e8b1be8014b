"""A streamed token's chunk is rendered without the generic JSON encoder (the fast path of
`_Chunks.text`): its bytes must be exactly those of the generic rendering, for any text."""

from __future__ import annotations

import json

import pytest

from pensieve.api.openai.routes import _CHAT_TEXT, _COMPLETION_TEXT, _Chunks, _delta

TEXTS = ["a", " world", "", 'say "hi"\\n', "line\nbreak\ttab\r", "\x00\x1f\x7f",
         "é漢字🙂", "</script>", "\u2028\u2029"]
META = {"id": "chatcmpl-1", "created": 1, "model": "m/q:4", "system_fingerprint": "p-m"}


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("index", [0, 3, 12])
def test_a_text_chunk_is_the_generic_chunk_byte_for_byte(text: str, index: int) -> None:
    chat = _Chunks(META, "chat.completion.chunk")
    assert chat.text(index, text, _CHAT_TEXT) == chat.choice(
        _delta(index, {"content": text}))
    completion = _Chunks(META, "text_completion")
    assert completion.text(index, text, _COMPLETION_TEXT) == completion.choice(
        {"index": index, "text": text, "logprobs": None, "finish_reason": None})


def test_a_text_chunk_is_one_server_sent_event_of_valid_json() -> None:
    raw = _Chunks(META, "chat.completion.chunk").text(0, 'q"\n', _CHAT_TEXT)
    assert raw.startswith(b"data: {") and raw.endswith(b"}\n\n") and raw.count(b"\n\n") == 1
    body = json.loads(raw[6:])
    assert body["choices"] == [{"index": 0, "delta": {"content": 'q"\n'}, "logprobs": None,
                                "finish_reason": None}]
    assert body["object"] == "chat.completion.chunk" and body["model"] == "m/q:4"
