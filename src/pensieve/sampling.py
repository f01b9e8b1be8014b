"""The ranges sampling knobs may take: one table read by the request models of every API family
(for the fields they share) and by a store model's defaults, so a value one accepts is never one
the other refuses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Bound:
    low: float
    high: float
    low_open: bool = False  # `low` itself is not allowed
    integer: bool = False

    def contains(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low, high = _number(self.low), _number(self.high)
        if self.low_open:
            return f"{kind} above {low} and at most {high}"
        return f"{kind} from {low} to {high}"

    def field_limits(self) -> dict[str, Any]:
        """The bound as pydantic `Field` keywords."""
        return {"gt" if self.low_open else "ge": self.low, "le": self.high}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# llama.cpp's DRY sequence breakers, as llama-server and text-generation-webui default them.
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")
MAX_DRY_SEQUENCE_BREAKERS = 32
MAX_DRY_SEQUENCE_BREAKER_LENGTH = 40  # llama.cpp truncates longer ones

BOUNDS: dict[str, Bound] = {
    "num_ctx": Bound(256, 1 << 20, integer=True),
    "num_predict": Bound(1, 1 << 20, integer=True),
    "seed": Bound(-(1 << 63), (1 << 64) - 1, integer=True),
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": Bound(0, 1 << 20, integer=True),
    "min_p": Bound(0.0, 1.0),
    "repeat_penalty": Bound(0.0, 10.0, low_open=True),
    "repeat_last_n": Bound(-1, 1 << 20, integer=True),  # -1: the whole context, 0: off
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "dry_multiplier": Bound(0.0, 5.0),  # 0: DRY off
    "dry_base": Bound(1.0, 4.0),
    "dry_allowed_length": Bound(1, 1024, integer=True),
    "dry_penalty_last_n": Bound(-1, 1 << 20, integer=True),  # -1: the whole context, 0: off
}

DRY_FIELDS = ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
              "dry_sequence_breakers")


def check_sequence_breakers(breakers: Sequence[object]) -> str | None:
    """Why these DRY sequence breakers are refused, or None."""
    if len(breakers) > MAX_DRY_SEQUENCE_BREAKERS:
        return f"at most {MAX_DRY_SEQUENCE_BREAKERS} dry_sequence_breakers are allowed"
    if any(not isinstance(b, str) or not 1 <= len(b) <= MAX_DRY_SEQUENCE_BREAKER_LENGTH
           for b in breakers):
        return (f"dry_sequence_breakers must be strings of 1 to "
                f"{MAX_DRY_SEQUENCE_BREAKER_LENGTH} characters")
    return None


def last_n_or_context(value: int) -> int | None:
    """A `*_last_n` as the APIs take it (-1: the whole context) as the engine takes it (None)."""
    return None if value == -1 else value
