"""The near-tie comparisons the e2e tests use for two greedy runs: both as logprobs, or one as
the text a client printed."""

from __future__ import annotations

import pytest

from tests.support.server import (
    assert_same_greedy_run,
    assert_text_follows_greedy_run,
    completion_entries,
)


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


def test_two_runs_agree_up_to_a_near_tie() -> None:
    assert_same_greedy_run(RUN, RUN)
    drifted = [_entry("Apple", -0.3, ("Pear", -0.2)), _entry(".", -0.4)]
    assert_same_greedy_run(RUN, drifted)  # the same tokens, logprobs within the tolerance
    # diverged where Apple and Pear were close; what follows may differ
    assert_same_greedy_run(RUN, [_entry("Pear", -0.2), _entry("s", -0.1)])


@pytest.mark.parametrize("other", [
    [_entry("Banana", -0.1)],  # not among the first run's alternatives
    [_entry("Apple", -0.1), _entry("!", -0.1)],  # an alternative, but 4.8 nats behind
    [_entry("Apple", -0.9), _entry(".", -0.2)],  # the same token, its logprob far off
])
def test_two_runs_that_differ_beyond_a_near_tie_fail(other: list) -> None:
    with pytest.raises(AssertionError):
        assert_same_greedy_run(RUN, other)


def test_completion_logprobs_become_entries() -> None:
    logprobs = {"tokens": ["Apple", "."], "token_logprobs": [-0.1, -0.2],
                "top_logprobs": [{"Apple": -0.1, "Pear": -0.3}, {".": -0.2}]}
    entries = completion_entries(logprobs)
    assert [e["token"] for e in entries] == ["Apple", "."]
    assert entries[0]["top_logprobs"] == [{"token": "Apple", "logprob": -0.1},
                                          {"token": "Pear", "logprob": -0.3}]
    assert_same_greedy_run(entries, [_entry("Pear", -0.2)])
