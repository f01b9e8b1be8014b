"""Model names (`namespace/model:tag`) and blob digests, validated so that nothing a client
sends can name a path outside the store.

A name is one to three `/`-separated parts of lowercase letters, digits, `.`, `_` and `-`, each
starting with a letter or digit (so never `.` or `..`), then an optional `:tag` (default
`latest`). Case is folded, as Ollama does. A digest is `sha256:` (or `sha256-`) and 64 hex digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pensieve.errors import InvalidRequest

DEFAULT_TAG = "latest"
_PART = r"[a-z0-9][a-z0-9._-]{0,79}"
_NAME_RE = re.compile(rf"{_PART}(?:/{_PART}){{0,2}}")
_TAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class ModelName:
    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def parts(self) -> tuple[str, ...]:
        """Path parts under the manifests folder: every name part, then the tag."""
        return (*self.name.split("/"), self.tag)


def parse_name(text: object) -> ModelName:
    """`owner/model:tag` -> ModelName; InvalidRequest for anything that is not a safe name
    (including a value that is not a string at all, as JSON may hold)."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise InvalidRequest("A model name must be a non-empty string of at most 300 "
                             "characters.", param="model")
    lowered = text.strip().lower()
    name, sep, tag = lowered.rpartition(":")
    if not sep:
        name, tag = lowered, DEFAULT_TAG
    if not _NAME_RE.fullmatch(name) or not _TAG_RE.fullmatch(tag):
        raise InvalidRequest(
            f"Invalid model name {text!r}: use `name` or `name:tag` (up to three `/`-separated "
            "parts) of letters, digits, '.', '_' and '-', each part starting with a letter or "
            "digit.", param="model")
    return ModelName(name, tag)


def parse_digest(text: object) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> the 64 lowercase hex digits."""
    match = _DIGEST_RE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise InvalidRequest(f"Invalid digest {text!r}: expected 'sha256:' and 64 hex digits.",
                             param="digest")
    return match.group(1)
