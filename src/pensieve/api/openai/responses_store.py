"""Stored responses of the Responses API (`store: true`, the default): what `GET
/v1/responses/{id}`, its input items and a later `previous_response_id` read back.

    <data_dir>/responses/
      resp_<hex>.json        {"response": {the Response object}, "input": [conversation items]}

One file per response, written whole (a temporary file renamed over it), so a crash leaves a
response stored or not, never half of one; the files survive restarts. Retention: at most
`max_count` responses (the oldest removed first) and none older than `max_age_s`. The
conversation's KV is not here: Pensieve's memory tiers keep it, keyed by its tokens, so a
follow-up that renders the same conversation finds it there.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pensieve.store.store import write_atomic

log = logging.getLogger("pensieve.api.responses")

_ID = re.compile(r"resp_[A-Za-z0-9]{1,64}")
_SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class ResponseStoreConfig:
    directory: Path | None  # None: kept in memory only, until the server stops
    max_count: int = 1000  # responses kept at most; 0: none
    max_age_s: float | None = 30 * 86400.0  # None: no age limit


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object, as it was returned
    input: list[dict[str, Any]]  # every item of the model's input, carried ones included
    session: str | None = None  # the conversation its chain is routed by (a cluster's hint)

    @property
    def id(self) -> str:
        return str(self.response["id"])

    def to_json(self) -> str:
        data: dict[str, Any] = {"response": self.response, "input": self.input}
        if self.session is not None:
            data["session"] = self.session
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StoredResponse:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("response"), dict) \
                or not isinstance(data.get("input"), list):
            raise ValueError("not a stored response")
        session = data.get("session")
        return cls(data["response"], data["input"],
                   session if isinstance(session, str) else None)


def is_response_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


class ResponseStore:
    """The stored responses, oldest first. Thread-safe: routes save and read off the event
    loop."""

    def __init__(self, config: ResponseStoreConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._saved_at: dict[str, float] = {}  # id -> when it was stored, oldest first
        self._memory: dict[str, StoredResponse] = {}  # when there is no directory
        if config.directory is not None:
            self._load_index(config.directory)
        self._prune()

    def __len__(self) -> int:
        return len(self._saved_at)

    def ids(self) -> list[str]:
        """The stored ids, oldest first."""
        with self._lock:
            return list(self._saved_at)

    def save(self, stored: StoredResponse) -> None:
        if self.config.max_count == 0:
            return
        rid = stored.id
        assert is_response_id(rid), rid
        if self.config.directory is not None:
            self.config.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(rid), stored.to_json())
        with self._lock:
            self._saved_at.pop(rid, None)
            self._saved_at[rid] = self._clock()
            if self.config.directory is None:
                self._memory[rid] = stored
        self._prune()

    def get(self, rid: str) -> StoredResponse | None:
        """The stored response, None when there is none (never stored, deleted, expired, or
        a file that cannot be read)."""
        with self._lock:
            saved_at = self._saved_at.get(rid)
            if saved_at is None:
                return None
            if self._is_expired(saved_at):
                self._forget(rid)
                return None
            if self.config.directory is None:
                return self._memory[rid]
        return self._read(rid)

    def delete(self, rid: str) -> bool:
        with self._lock:
            if rid not in self._saved_at:
                return False
            self._forget(rid)
            return True

    # --- retention ---

    def _prune(self) -> None:
        """Expired responses, then the oldest beyond the count limit."""
        with self._lock:
            expired = {rid for rid, at in self._saved_at.items() if self._is_expired(at)}
            kept = [rid for rid in self._saved_at if rid not in expired]
            surplus = max(0, len(kept) - self.config.max_count)
            for rid in [*expired, *kept[:surplus]]:
                self._forget(rid)

    def _is_expired(self, saved_at: float) -> bool:
        max_age = self.config.max_age_s
        return max_age is not None and self._clock() - saved_at > max_age

    def _forget(self, rid: str) -> None:
        """Drop one response (the caller holds the lock)."""
        del self._saved_at[rid]
        self._memory.pop(rid, None)
        if self.config.directory is not None:
            self._path(rid).unlink(missing_ok=True)

    # --- files ---

    def _path(self, rid: str) -> Path:
        assert self.config.directory is not None
        return self.config.directory / f"{rid}{_SUFFIX}"

    def _load_index(self, directory: Path) -> None:
        """The files a previous run left, by their modification time; temporary files of
        writes a crash interrupted are removed."""
        if not directory.is_dir():
            return
        found: list[tuple[float, str]] = []
        for path in directory.iterdir():
            if path.name.startswith(".") and ".tmp" in path.name:
                path.unlink(missing_ok=True)
            elif path.suffix == _SUFFIX and is_response_id(path.stem):
                try:
                    found.append((path.stat().st_mtime, path.stem))
                except OSError:
                    continue
        for saved_at, rid in sorted(found):
            self._saved_at[rid] = saved_at

    def _read(self, rid: str) -> StoredResponse | None:
        try:
            stored = StoredResponse.from_json(self._path(rid).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("stored response %s cannot be read (%s); it is forgotten", rid, exc)
            with self._lock:
                if rid in self._saved_at:
                    self._forget(rid)
            return None
        return stored if stored.id == rid else None
