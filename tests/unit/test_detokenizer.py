from pensieve.engine.detokenizer import IncrementalDetokenizer

# A scripted vocabulary: token id -> bytes. "é" is split across two tokens (0xC3 0xA9).
VOCAB = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xc3", 6: b"\xa9", 7: b"!", 8: b" END",
         9: b"E", 10: b"N", 11: b"D", 12: b"\xf0\x9f", 13: b"\x98\x80"}


def run(tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(VOCAB.__getitem__, stop)
    return [d.add_token(t) for t in tokens], d


def test_text_is_released_token_by_token() -> None:
    deltas, d = run([1, 2, 3, 4])
    assert deltas == ["Hel", "lo", " wor", "ld"]
    assert d.text == "Hello world"


def test_a_character_split_across_tokens_is_never_half_sent() -> None:
    deltas, d = run([1, 5, 6, 7])
    assert deltas == ["Hel", "", "é", "!"]
    deltas, _ = run([12, 13])
    assert deltas == ["", "\U0001F600"]


def test_stop_string_is_cut_and_never_sent() -> None:
    deltas, d = run([1, 2, 8, 7], stop=(" END",))
    assert "".join(deltas) == "Hello"
    assert d.stopped and d.text == "Hello"
    assert deltas[3] == ""  # nothing after a stop


def test_a_possible_stop_prefix_is_held_back_then_released() -> None:
    deltas, d = run([1, 9, 10, 7], stop=("END",))
    assert deltas == ["Hel", "", "", "EN!"]
    assert not d.stopped


def test_stop_spanning_several_tokens() -> None:
    deltas, d = run([1, 9, 10, 11, 7], stop=("END",))
    assert "".join(deltas) == "Hel"
    assert d.stopped


def test_flush_releases_held_text_and_incomplete_bytes() -> None:
    d = IncrementalDetokenizer(VOCAB.__getitem__, ("END",))
    assert d.add_token(1) == "Hel"
    assert d.add_token(9) == ""
    assert d.flush() == "E"
    d2 = IncrementalDetokenizer(VOCAB.__getitem__)
    d2.add_token(5)
    assert d2.flush() == "\ufffd"  # an unfinished character is replaced, not dropped silently


def test_earliest_of_several_stops_wins() -> None:
    deltas, d = run([1, 2, 3, 4], stop=("world", "lo w"))
    assert "".join(deltas) == "Hel"
