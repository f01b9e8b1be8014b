"""A store model's defaults (its Modelfile-like settings) fill what a request leaves unset:
sampling fields, the answer length, a system prompt, a chat template override."""

from __future__ import annotations

from typing import Any, TypeVar

from pensieve.api.openai.protocol import _SamplingFields
from pensieve.store.store import ModelDefaults

RequestT = TypeVar("RequestT", bound=_SamplingFields)

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
_LENGTH_FIELDS = {"max_tokens", "max_completion_tokens"}


def with_model_defaults(body: RequestT, defaults: ModelDefaults) -> RequestT:
    """The request with the model's defaults for every field the client did not send."""
    sent = body.model_fields_set
    updates: dict[str, object] = {
        name: getattr(defaults, name) for name in _SAMPLING
        if name not in sent and getattr(defaults, name) is not None}
    if defaults.stop and "stop" not in sent:
        updates["stop"] = list(defaults.stop)
    if defaults.num_predict is not None and not sent & _LENGTH_FIELDS:
        updates["max_tokens"] = defaults.num_predict
    return body.model_copy(update=updates) if updates else body


def with_system_prompt(messages: list[dict[str, Any]],
                       defaults: ModelDefaults) -> list[dict[str, Any]]:
    """The model's default system prompt, unless the conversation brings its own."""
    if defaults.system is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": defaults.system}, *messages]
