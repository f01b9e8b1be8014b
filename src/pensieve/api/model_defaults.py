"""A store model's defaults (its Modelfile-like settings) fill what a request leaves unset:
sampling fields, the answer length, a system prompt, a chat template override."""

from __future__ import annotations

import dataclasses
from typing import Any

from pensieve.engine.types import SamplingParams
from pensieve.sampling import last_n_or_context
from pensieve.store.store import ModelDefaults

# SamplingParams fields a model default can fill, by the name ModelDefaults gives them (Ollama's
# and llama-server's names).
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "min_p": "min_p", "repeat_penalty": "repeat_penalty", "seed": "seed",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "dry_multiplier": "dry_multiplier", "dry_base": "dry_base",
             "dry_allowed_length": "dry_allowed_length",
             "dry_sequence_breakers": "dry_sequence_breakers", "num_predict": "max_tokens"}
_LAST_N = {"repeat_last_n": "penalty_last_n", "dry_penalty_last_n": "dry_penalty_last_n"}


def fill_defaults(params: SamplingParams, sent: frozenset[str],
                  defaults: ModelDefaults) -> SamplingParams:
    """`params` with the model's defaults for every field the client did not send (`sent`
    names SamplingParams fields)."""
    updates: dict[str, Any] = {
        field: getattr(defaults, name) for name, field in _SAMPLING.items()
        if field not in sent and getattr(defaults, name) is not None}
    updates.update({field: last_n_or_context(getattr(defaults, name))
                    for name, field in _LAST_N.items()
                    if field not in sent and getattr(defaults, name) is not None})
    if "seed" in updates:
        updates["seed"] &= 0xFFFFFFFF
    if defaults.stop and "stop" not in sent:
        updates["stop"] = tuple(defaults.stop)
    return dataclasses.replace(params, **updates) if updates else params


def with_system_prompt(messages: list[dict[str, Any]],
                       defaults: ModelDefaults) -> list[dict[str, Any]]:
    """The model's default system prompt, unless the conversation brings its own."""
    if defaults.system is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": defaults.system}, *messages]
