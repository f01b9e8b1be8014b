"""Sampling fields the three API families share beyond their own specs, by llama-server's and
Ollama's names: llama.cpp's DRY sampler and the repeat penalty's window. Mixed into the request
models (OpenAI and Anthropic bodies, Ollama's `options`); bounds from `pensieve.sampling`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from pensieve.sampling import BOUNDS, DRY_FIELDS, check_sequence_breakers, last_n_or_context


def _limits(name: str) -> Any:
    return Field(None, **BOUNDS[name].field_limits())


class RepetitionFields(BaseModel):
    repeat_last_n: int | None = _limits("repeat_last_n")
    dry_multiplier: float | None = _limits("dry_multiplier")
    dry_base: float | None = _limits("dry_base")
    dry_allowed_length: int | None = _limits("dry_allowed_length")
    dry_penalty_last_n: int | None = _limits("dry_penalty_last_n")
    dry_sequence_breakers: list[str] | None = None

    @field_validator("dry_sequence_breakers")
    @classmethod
    def _check_breakers(cls, value: list[str] | None) -> list[str] | None:
        problem = None if value is None else check_sequence_breakers(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def repetition_params(self) -> dict[str, Any]:
        """What was set, as `SamplingParams` keywords (the rest keeps the engine's defaults)."""
        values: dict[str, Any] = {
            name: getattr(self, name) for name in DRY_FIELDS if getattr(self, name) is not None}
        if "dry_penalty_last_n" in values:
            values["dry_penalty_last_n"] = last_n_or_context(values["dry_penalty_last_n"])
        if "dry_sequence_breakers" in values:
            values["dry_sequence_breakers"] = tuple(values["dry_sequence_breakers"])
        if self.repeat_last_n is not None:
            values["penalty_last_n"] = last_n_or_context(self.repeat_last_n)
        return values


# SamplingParams fields that every family's request models name alike; `sent_fields` maps the
# rest by each family's renames.
_SAME_NAMES = frozenset({"temperature", "top_p", "top_k", "min_p", "seed", "stop",
                         "repeat_penalty", "presence_penalty", "frequency_penalty", "max_tokens",
                         *DRY_FIELDS})
_RENAMED = {"repeat_last_n": "penalty_last_n"}


def sent_fields(fields_set: set[str], renames: dict[str, str]) -> frozenset[str]:
    """The SamplingParams fields a request set (by their SamplingParams names), from the request
    fields it set: a store model's defaults fill only the others."""
    names = {**_RENAMED, **renames}
    return frozenset(names.get(f, f) for f in fields_set if f in names or f in _SAME_NAMES)
