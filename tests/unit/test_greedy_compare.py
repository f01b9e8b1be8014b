"""The near-tie comparison the e2e tests use for greedy runs that a client printed as text."""

from __future__ import annotations

import pytest

from tests.support.server import assert_text_follows_greedy_run


def _entry(token: str, logprob: float, *alts: tuple[str, float]) -> dict:
    top = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    top += [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": top}


RUN = [_entry("Apple", -0.1, ("Pear", -0.3)), _entry(".", -0.2, ("!", -5.0)),
       _entry("\n", -0.5)]


def test_the_same_text_follows_and_trailing_whitespace_is_ignored() -> None:
    assert_text_follows_greedy_run("Apple.", RUN)
    assert_text_follows_greedy_run("Apple.\n", RUN)


def test_a_divergence_at_a_near_tie_is_accepted() -> None:
    assert_text_follows_greedy_run("Pear, of course", RUN)


@pytest.mark.parametrize("text", ["Apple!", "Banana", "Apple", "Apple. And more"])
def test_far_divergences_and_missing_or_extra_text_fail(text: str) -> None:
    with pytest.raises(AssertionError):
        assert_text_follows_greedy_run(text, RUN)
