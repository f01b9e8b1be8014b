"""JSON schema -> GBNF without the model: what is refused, and the integer-range rules checked
exhaustively against a small GBNF matcher for the subset they use."""

from __future__ import annotations

import re

import pytest

from pensieve.errors import InvalidRequest
from pensieve.structured import (
    JSON_OBJECT_GRAMMAR,
    UnsupportedSchema,
    check_gbnf,
    grammar_for_json_schema,
    integer_range_rule,
    rewrite_pattern,
)
from tests.support.schemas import SCHEMAS, UNSUPPORTED


def _as_regex(rule: str) -> str:
    """The integer-range rules use only literals, classes, groups, | and {n}: all regex too."""
    return re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", "")


@pytest.mark.parametrize(("low", "high"), [(0, 0), (0, 9), (1, 5), (7, 123), (10, 99),
                                           (-12, 305), (-1000, -1), (-5, 5), (95, 1050),
                                           (1900, 1999), (-99, -10)])
def test_integer_range_rule_matches_exactly_the_range(low: int, high: int) -> None:
    pattern = re.compile(_as_regex(integer_range_rule(low, high)))
    for n in range(low - 120, high + 120):
        assert bool(pattern.fullmatch(str(n))) == (low <= n <= high), n
    assert not pattern.fullmatch("0" + str(abs(high)))  # no leading zeros


@pytest.mark.parametrize(("prompt", "schema"), SCHEMAS)
def test_every_test_schema_converts(prompt: str, schema: dict) -> None:
    assert "root ::=" in grammar_for_json_schema(schema)


@pytest.mark.parametrize(("schema", "keyword"), UNSUPPORTED)
def test_unsupported_keywords_are_named(schema: dict, keyword: str) -> None:
    with pytest.raises(UnsupportedSchema) as err:
        grammar_for_json_schema(schema)
    assert repr(keyword) in err.value.message
    assert err.value.status_code == 400


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
    {"type": "string", "pattern": "^a", "minLength": 3},
    {"enum": [1, 2], "type": "string"},
    {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}},
    {"type": "string", "maxLength": 10**6},
    {"type": "integer", "minimum": 10, "maximum": 2},
    {"type": "frobnicate"},
    True,
])
def test_schemas_the_grammar_would_get_wrong_are_refused(schema: object) -> None:
    with pytest.raises(UnsupportedSchema):
        grammar_for_json_schema(schema)


@pytest.mark.parametrize(("pattern", "expected"), [
    ("^[a-z]+$", "^[a-z]+$"), ("^v\\.[0-9]$", "^v[.][0-9]$"), ("^(a|b){2}$", "^(a|b){2}$"),
    ("abc", None), ("^\\d+$", None), ("^[^a]$", None), ('^"$', None), ("^(?=a)$", None),
    ("^[\\]]$", None),
])
def test_patterns_outside_the_sound_subset_are_refused(pattern: str,
                                                       expected: str | None) -> None:
    assert rewrite_pattern(pattern) == expected


def test_strings_never_allow_raw_quotes_or_control_characters() -> None:
    grammar = grammar_for_json_schema({"type": "string", "pattern": "^a.b$"})
    assert "[^\\x0A\\x0D]" not in grammar  # the converter's own dot
    assert 'dot ::= [^"\\\\\\x7F\\x00-\\x1F]' in grammar
    assert "char ::= [^\"\\\\\\x7F\\x00-\\x1F]" in JSON_OBJECT_GRAMMAR


@pytest.mark.parametrize("grammar", ['root ::= "a"{3,1}', 'root ::= "a"{5000}',
                                     "root ::= " + "x" * 70000])
def test_raw_grammars_llama_cpp_would_hang_on_are_refused(grammar: str) -> None:
    with pytest.raises(InvalidRequest):
        check_gbnf(grammar)


def test_braces_inside_literals_are_not_repetitions() -> None:
    check_gbnf('root ::= "{9999}" [{}] "a"{1,3}')
