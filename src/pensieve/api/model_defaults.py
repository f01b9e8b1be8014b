"""A store model's defaults (its Modelfile-like settings) fill what a request leaves unset:
sampling fields, the answer length, a system prompt, a chat template override."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from pensieve.sampling import DRY_FIELDS
from pensieve.store.store import ModelDefaults

BodyT = TypeVar("BodyT", bound=BaseModel)

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
             "presence_penalty", "frequency_penalty", "seed", *DRY_FIELDS)
_OPENAI_LENGTH = ("max_tokens", "max_completion_tokens")


def with_model_defaults(body: BodyT, defaults: ModelDefaults, *, stop_field: str = "stop",
                        length_fields: tuple[str, ...] = _OPENAI_LENGTH) -> BodyT:
    """The request (an OpenAI or Anthropic body, Ollama's `options`) with the model's defaults
    for every field it has and the client did not send. `num_predict` fills the first of
    `length_fields` unless the client sent any of them."""
    sent, known = body.model_fields_set, type(body).model_fields
    updates: dict[str, object] = {}
    for name in _SAMPLING:
        value = getattr(defaults, name)
        if name in known and name not in sent and value is not None:
            updates[name] = list(value) if isinstance(value, tuple) else value
    if defaults.stop and stop_field in known and stop_field not in sent:
        updates[stop_field] = list(defaults.stop)
    if defaults.num_predict is not None and length_fields and not sent & set(length_fields):
        updates[length_fields[0]] = defaults.num_predict
    return body.model_copy(update=updates) if updates else body


def with_system_prompt(messages: list[dict[str, Any]],
                       defaults: ModelDefaults) -> list[dict[str, Any]]:
    """The model's default system prompt, unless the conversation brings its own."""
    if defaults.system is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": defaults.system}, *messages]
