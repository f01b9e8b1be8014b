"""Incremental, UTF-8 safe detokenization with stop strings that are never partly sent.

Token pieces are bytes; a character may span several tokens, so bytes go through an incremental
UTF-8 decoder that holds back an incomplete tail. Text that could still turn into a stop string is
held back too: only the longest suffix of the text that is a proper prefix of some stop string is
kept, everything before it is released.

    text:   ... already sent | releasable | held (prefix of a stop string)
                             ^ num_sent   ^ len(text) - held
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, piece: Callable[[int], bytes], stop: tuple[str, ...] = ()) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._text = ""
        self._num_sent = 0
        self.stopped = False
        self.matched_stop: str | None = None  # the stop string that ended the text, if one did

    @property
    def text(self) -> str:
        """All text produced so far, cut before a matched stop string."""
        return self._text

    def add_token(self, token: int) -> str:
        """Feed one generated token; returns the text that is now safe to send (maybe "")."""
        if self.stopped:
            return ""
        new = self._decoder.decode(self._piece(token))
        if not new:
            return ""
        search_from = max(0, len(self._text) - self._max_stop_len() + 1)
        self._text += new
        if self._stop and self._cut_at_stop(search_from):
            return self._release(len(self._text))
        return self._release(len(self._text) - self._held_len())

    def flush(self) -> str:
        """Release everything held back (the request is finishing for another reason)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(len(self._text))

    def _cut_at_stop(self, search_from: int) -> bool:
        hits = [(i, s) for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        if not hits:
            return False
        cut, self.matched_stop = min(hits, key=lambda hit: hit[0])
        self._text = self._text[:cut]
        self.stopped = True
        return True

    def _held_len(self) -> int:
        text = self._text
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _max_stop_len(self) -> int:
        return max((len(s) for s in self._stop), default=1)

    def _release(self, end: int) -> str:
        end = max(end, self._num_sent)
        out = self._text[self._num_sent : end]
        self._num_sent = end
        return out
