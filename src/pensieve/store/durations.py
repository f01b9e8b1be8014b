"""Ollama-style keep_alive values: seconds as a number, or a duration string (`30s`, `5m`,
`1h30m`). Zero unloads at once; a negative value keeps the model loaded for good (None)."""

from __future__ import annotations

import re

from pensieve.errors import InvalidRequest

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_MAX_SECONDS = 10 * 365 * 86400.0


def parse_keep_alive(value: object) -> float | None:
    """-> seconds idle before unloading, or None for never."""
    if isinstance(value, bool):
        raise _invalid(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        raise _invalid(value)
    if seconds != seconds:  # NaN
        raise _invalid(value)
    if seconds < 0:
        return None
    return min(seconds, _MAX_SECONDS)


def _parse_text(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("-")
    try:
        return sign * float(body)
    except ValueError:
        pass
    parts = _PART_RE.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise _invalid(text)
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def _invalid(value: object) -> InvalidRequest:
    return InvalidRequest(f"Invalid keep_alive {value!r}: use seconds or a duration like "
                          "'30s', '5m', '1h'; negative keeps the model loaded.",
                          param="keep_alive")
