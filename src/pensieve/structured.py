"""Structured output: JSON schemas turned into GBNF grammars that llama.cpp enforces while sampling.

The conversion itself is llama-cpp-python's `SchemaConverter`; Pensieve adds what it lacks:

- a checker that walks the schema first and refuses (400, naming the keyword and where it is) any
  keyword the grammar could not enforce, so output is never silently unconstrained;
- integer and number bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`), as
  digit-range rules;
- `{}` as "any JSON value" and `type` lists that carry other keywords.

The grammar may be stricter than the schema (objects get no properties the schema does not name,
numbers under bounds have no exponent), never looser: every output it allows validates.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pensieve.errors import InvalidRequest


def _load_llama_grammar() -> ModuleType:
    """llama-cpp-python's `llama_grammar` module, which is plain Python, loaded from its file:
    `import llama_cpp.llama_grammar` would first run the package's `__init__`, which loads
    libllama and numpy (~0.2 s), and the API process imports this module on the way to serving
    while the model loads. The worker, which needs llama.cpp, imports the package normally."""
    name = "pensieve._llama_grammar"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("llama_cpp")  # finds the package without running it
    assert package is not None and package.submodule_search_locations is not None
    path = Path(next(iter(package.submodule_search_locations))) / "llama_grammar.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_grammar = _load_llama_grammar()
PRIMITIVE_RULES: dict[str, Any] = _grammar.PRIMITIVE_RULES
if TYPE_CHECKING:
    from llama_cpp.llama_grammar import BuiltinRule

JSON_OBJECT_GRAMMAR = r"""root ::= object
object ::= "{" space ( string ":" space value ("," space string ":" space value)* )? "}" space
value ::= object | array | string | number | ("true" | "false" | "null") space
array ::= "[" space ( value ("," space value)* )? "]" space
string ::= "\"" char* "\"" space
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
number ::= "-"? ([0-9] | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? space
space ::= " "?
"""
"""Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""

_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "$defs", "definitions",
})
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MAX_DIGITS = 15  # JSON integers the grammar writes have at most this many digits
_MAX_REPEAT = 1000  # minItems, maxItems, minLength, maxLength
_PATTERN_ESCAPES = frozenset("[](){}|*+?")
_SAFE_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_SAFE_DOT = r'[^"\\\x7F\x00-\x1F]'


class UnsupportedSchema(InvalidRequest):
    """The schema uses something the grammar cannot enforce."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param, code="unsupported_schema")


def grammar_for_json_schema(schema: Any, strict: bool = True) -> str:
    """A GBNF grammar (root rule `root`) whose every output validates against `schema`.

    Raises `UnsupportedSchema` (a 400) naming the first keyword that cannot be enforced. `strict`
    is accepted for OpenAI compatibility: Pensieve always enforces the whole schema.
    """
    del strict  # every schema is enforced fully; there is no best-effort mode
    if not isinstance(schema, dict):
        raise UnsupportedSchema("The JSON schema must be an object.", "response_format")
    _Checker(schema).check(schema, "#")
    converter = _Converter()
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UnsupportedSchema(f"The JSON schema cannot be turned into a grammar: {exc}",
                                "response_format") from exc
    return converter.format_grammar()


def _unsupported(keyword: str, where: str, why: str = "") -> UnsupportedSchema:
    reason = f" ({why})" if why else ""
    return UnsupportedSchema(
        f"The JSON schema keyword {keyword!r} at {where} cannot be enforced by constrained "
        f"decoding{reason}. Remove it or rewrite the schema without it.", "response_format")


class _Checker:
    """Walks a schema and raises on the first keyword the converter would ignore."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def check(self, schema: Any, where: str) -> None:
        if not isinstance(schema, dict):
            raise _unsupported(str(schema), where, "schemas must be objects")
        keys = set(schema) - _ANNOTATIONS
        for defs in ("$defs", "definitions"):
            for name, sub in (schema.get(defs) or {}).items():
                self.check(sub, f"{where}/{defs}/{name}")
        if "$ref" in keys:
            self._check_ref(schema["$ref"], keys, where)
        elif "anyOf" in keys:
            self._only(keys, {"anyOf"}, where, "beside anyOf")
            self._check_list(schema["anyOf"], f"{where}/anyOf")
        elif "const" in keys or "enum" in keys:
            self._check_literals(schema, keys, where)
        else:
            self._check_typed(schema, keys, where)

    def _only(self, keys: set[str], allowed: set[str], where: str, why: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise _unsupported(extra[0], where, why)

    def _check_list(self, schemas: Any, where: str) -> None:
        if not isinstance(schemas, list) or not schemas:
            raise _unsupported(where.rsplit("/", 1)[-1], where, "must be a non-empty list")
        for i, sub in enumerate(schemas):
            self.check(sub, f"{where}/{i}")

    def _check_ref(self, ref: Any, keys: set[str], where: str) -> None:
        self._only(keys, {"$ref"}, where, "keywords beside $ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _unsupported("$ref", where, "only local references like '#/$defs/x'")
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise _unsupported("$ref", where, f"{ref!r} does not resolve")
            target = target[part]

    def _check_literals(self, schema: dict[str, Any], keys: set[str], where: str) -> None:
        kind = "const" if "const" in keys else "enum"
        self._only(keys, {kind, "type"}, where, f"beside {kind}")
        values = [schema["const"]] if kind == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise _unsupported("enum", where, "must be a non-empty list")
        types = _type_list(schema.get("type"), where)
        if types and any(not _matches_type(v, types) for v in values):
            raise _unsupported(kind, where, "a value does not have the schema's type")

    def _check_typed(self, schema: dict[str, Any], keys: set[str], where: str) -> None:
        types = _type_list(schema.get("type"), where)
        if not types:
            if keys:
                raise _unsupported(sorted(keys)[0], where, "not supported")
            return  # {}: any JSON value
        allowed = {"type"}
        for t in types:
            allowed |= self._check_one_type(t, schema, where)
        self._only(keys, allowed, where, f"not supported for type {'/'.join(types)}")

    def _check_one_type(self, t: str, schema: dict[str, Any], where: str) -> set[str]:
        if t == "object":
            return self._check_object(schema, where)
        if t == "array":
            return self._check_array(schema, where)
        if t == "string":
            return _check_string(schema, where)
        if t in ("integer", "number"):
            _check_bounds(schema, t, where)
            return set(_BOUNDS)
        return set()

    def _check_object(self, schema: dict[str, Any], where: str) -> set[str]:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise _unsupported("properties", where, "must be an object")
        for name, sub in props.items():
            self.check(sub, f"{where}/properties/{name}")
        required = schema.get("required", [])
        missing = [r for r in required if r not in props] if isinstance(required, list) else [0]
        if missing:
            raise _unsupported("required", where, f"names {missing[0]!r}, not in properties")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            self.check(extra, f"{where}/additionalProperties")
        elif extra is not None and not isinstance(extra, bool):
            raise _unsupported("additionalProperties", where, "must be a boolean or a schema")
        return {"properties", "required", "additionalProperties"}

    def _check_array(self, schema: dict[str, Any], where: str) -> set[str]:
        if "prefixItems" in schema or isinstance(schema.get("items"), list):
            key = "prefixItems" if "prefixItems" in schema else "items"
            self._check_list(schema[key], f"{where}/{key}")
            if key == "prefixItems" and "items" in schema:
                raise _unsupported("items", where, "beside prefixItems")
            return {key}
        if "items" in schema:
            self.check(schema["items"], f"{where}/items")
        _check_counts(schema, ("minItems", "maxItems"), where)
        return {"items", "minItems", "maxItems"}


def _check_string(schema: dict[str, Any], where: str) -> set[str]:
    if "pattern" in schema:
        if not isinstance(schema["pattern"], str) or rewrite_pattern(schema["pattern"]) is None:
            raise _unsupported("pattern", where, "only anchored patterns '^...$' of literals, "
                               "'.', classes [a-z] without escapes, groups, '|' and quantifiers; "
                               "no \\d, \\w, [^...], lookarounds, (?...) or '\"'")
        return {"pattern"}
    if "format" in schema:
        if schema["format"] not in _FORMATS:
            raise _unsupported("format", where, f"supported: {', '.join(sorted(_FORMATS))}")
        return {"format"}
    _check_counts(schema, ("minLength", "maxLength"), where)
    return {"minLength", "maxLength"}


def _check_counts(schema: dict[str, Any], keys: tuple[str, str], where: str) -> None:
    low, high = (schema.get(k) for k in keys)
    for key, value in zip(keys, (low, high), strict=True):
        if value is not None and (not _is_int(value) or not 0 <= value <= _MAX_REPEAT):
            raise _unsupported(key, where, f"must be an integer from 0 to {_MAX_REPEAT}")
    if low is not None and high is not None and low > high:
        raise _unsupported(keys[0], where, f"greater than {keys[1]}")


def _check_bounds(schema: dict[str, Any], kind: str, where: str) -> None:
    limit = 10**_MAX_DIGITS
    for key in _BOUNDS:
        value = schema.get(key)
        if value is not None and (not _is_number(value) or abs(value) >= limit):
            raise _unsupported(key, where, f"must be a number of magnitude below {limit}")
    low, high = _bounds_of(schema)
    if kind == "integer" and low is not None and high is not None and low > high:
        raise _unsupported("minimum", where, "no integer lies within the bounds")
    if kind == "number" and _number_range(low, high) is None:
        raise _unsupported("minimum", where, "the bounds must contain an integer")


def _type_list(value: Any, where: str) -> list[str]:
    types = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(types, list) or any(t not in _TYPES for t in types):
        raise _unsupported("type", where, f"types are {', '.join(sorted(_TYPES))}")
    return types


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _matches_type(value: Any, types: list[str]) -> bool:
    checks = {
        "null": value is None, "boolean": isinstance(value, bool), "string": isinstance(value, str),
        "integer": _is_int(value), "number": _is_number(value),
        "array": isinstance(value, list), "object": isinstance(value, dict),
    }
    return any(checks[t] for t in types)


# --- integer bounds ------------------------------------------------------------------------
def _bounds_of(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """Inclusive integer bounds; a number's bounds become those of its integer part."""
    low = high = None
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        e = schema["exclusiveMinimum"]
        low = max(low if low is not None else -math.inf, math.floor(e) + 1)
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        e = schema["exclusiveMaximum"]
        high = min(high if high is not None else math.inf, math.ceil(e) - 1)
    return (None if low is None else int(low)), (None if high is None else int(high))


def _number_range(low: int | None, high: int | None) -> tuple[int, int] | None:
    lo = -(10**_MAX_DIGITS - 1) if low is None else low
    hi = 10**_MAX_DIGITS - 1 if high is None else high
    return (lo, hi) if lo <= hi else None


def integer_range_rule(low: int, high: int) -> str:
    """GBNF for the decimal integers from `low` to `high` (inclusive), without leading zeros."""
    assert low <= high
    parts = []
    if low < 0:
        parts.append('"-" (' + _magnitudes(max(1, -min(high, -1)), -low) + ")")
    if high >= 0:
        parts.append(_magnitudes(max(low, 0), high))
    return " | ".join(f"({p})" for p in parts)


def _magnitudes(low: int, high: int) -> str:
    """Non-negative integers from `low` to `high`, grouped by number of digits."""
    alts = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = 0 if digits == 1 else 10 ** (digits - 1)
        lo, hi = max(low, first), min(high, 10**digits - 1)
        if lo <= hi:
            alts.append(_same_length(str(lo), str(hi)))
    return " | ".join(alts)


def _same_length(lo: str, hi: str) -> str:
    """Digit strings of equal length between `lo` and `hi` (inclusive), as GBNF."""
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return f'"{lo[0]}" ({_same_length(lo[1:], hi[1:])})'
    rest = len(lo) - 1
    alts = [f'"{lo[0]}" ({_same_length(lo[1:], "9" * rest)})']
    if int(hi[0]) - int(lo[0]) > 1:
        alts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}] [0-9]{{{rest}}}")
    alts.append(f'"{hi[0]}" ({_same_length("0" * rest, hi[1:])})')
    return " | ".join(alts)


def rewrite_pattern(pattern: str) -> str | None:
    """The pattern in the regex subset the converter translates soundly, or None if outside it.

    Inside a JSON string the grammar must never emit a raw quote, backslash or control
    character, so patterns that could (negated classes, quotes, escapes it would copy into GBNF
    verbatim) are refused; an escaped dot becomes the class [.].
    """
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or pattern[-2] == "\\":
        return None
    if '"' in pattern or "[^" in pattern or "(?" in pattern:
        return None
    out, in_class, i = [], False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1] if i + 1 < len(pattern) else ""
            if in_class or (nxt not in _PATTERN_ESCAPES and nxt != "."):
                return None
            out.append("[.]" if nxt == "." else c + nxt)
            i += 2
            continue
        in_class = (in_class and c != "]") or (not in_class and c == "[")
        out.append(c)
        i += 1
    return "".join(out)


if TYPE_CHECKING:
    class _SchemaConverter:
        """What this module uses of llama-cpp-python's SchemaConverter, which is unannotated."""

        def __init__(self, *, prop_order: dict[str, int], allow_fetch: bool, dotall: bool,
                     raw_pattern: bool) -> None: ...
        def resolve_refs(self, schema: dict[str, Any], url: str) -> dict[str, Any]: ...
        def visit(self, schema: dict[str, Any], name: str) -> str: ...
        def format_grammar(self) -> str: ...
        def _add_rule(self, name: str, rule: str) -> str: ...
        def _add_primitive(self, name: str, rule: BuiltinRule) -> str: ...
        def _generate_union_rule(self, name: str, alt_schemas: list[dict[str, Any]]) -> str: ...
else:
    _SchemaConverter = _grammar.SchemaConverter


class _Converter(_SchemaConverter):
    """llama-cpp-python's converter plus bounds, `{}` as any value and multi-type schemas."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def visit(self, schema: dict[str, Any], name: str) -> str:
        rule_name = name or "root"
        kind = schema.get("type")
        keys = set(schema) - _ANNOTATIONS
        if not keys:
            return self._add_rule(rule_name, self._add_primitive("value", PRIMITIVE_RULES["value"]))
        if isinstance(kind, list) and "$ref" not in keys and "anyOf" not in keys:
            alts = [{**schema, "type": t} for t in kind]
            return self._add_rule(rule_name, self._generate_union_rule(name, alts))
        if kind in ("integer", "number") and any(k in schema for k in _BOUNDS):
            return self._add_rule(rule_name, self._bounded(schema, kind))
        if kind == "array" and "items" not in schema and "prefixItems" not in schema:
            return super().visit({**schema, "items": {"title": "any"}}, name)  # {} is falsy there
        if "pattern" in schema:
            return super().visit({**schema, "pattern": rewrite_pattern(schema["pattern"])}, name)
        return super().visit(schema, name)

    def _add_rule(self, name: str, rule: str) -> str:
        # The converter's "dot" lets raw quotes and control characters into a JSON string.
        return super()._add_rule(name, _SAFE_DOT if name == "dot" else rule)

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if name == "char":  # the same for its string characters
            return self._add_rule("char", _SAFE_CHAR)
        return super()._add_primitive(name, rule)

    def _bounded(self, schema: dict[str, Any], kind: str) -> str:
        span = _number_range(*_bounds_of(schema))
        assert span is not None
        lo, hi = span
        if kind == "integer":
            return f"({integer_range_rule(lo, hi)}) space"
        # A number: any fraction after an integer part in [lo, hi - 1]; hi itself exactly. For
        # negative integer parts the fraction moves away from zero, so those stop at lo + 1.
        alts = []
        frac_lo, frac_hi = max(lo + 1, 0) if lo < 0 else lo, hi - 1
        if lo < 0 <= hi:
            alts.append('"-0." [0-9]{1,15}')
        if frac_lo <= frac_hi:
            alts.append(f'({integer_range_rule(frac_lo, frac_hi)}) ("." [0-9]{{1,15}})?')
        if lo < 0:
            neg_hi = min(hi, -1)
            if lo + 1 <= neg_hi:
                alts.append(f'({integer_range_rule(lo + 1, neg_hi)}) "." [0-9]{{1,15}}')
        alts.append(f'({integer_range_rule(lo, hi)})')
        return "(" + " | ".join(alts) + ") space"


_GBNF_REPEAT = re.compile(r"\{\s*(\d*)\s*(,?)\s*(\d*)\s*\}")
MAX_GRAMMAR_CHARS = 1 << 16


def check_gbnf(grammar: str) -> None:
    """Refuse raw GBNF that llama.cpp would hang or run out of memory on, before it sees it.

    llama.cpp's parser rejects malformed grammars cleanly (the worker then answers 400); what it
    does not survive is a repetition `{m,n}` with n < m or a huge count, so those are caught here.
    """
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"The grammar is longer than {MAX_GRAMMAR_CHARS} characters.",
                             param="grammar", code="invalid_grammar")
    for match in _GBNF_REPEAT.finditer(_strip_literals(grammar)):
        low, comma, high = match.groups()
        counts = [int(x) for x in (low, high) if x]
        reversed_ = bool(comma and low and high and int(high) < int(low))
        if any(c > _MAX_REPEAT for c in counts) or reversed_:
            raise InvalidRequest(
                f"The grammar repetition {match.group(0)!r} is invalid: counts must be at most "
                f"{_MAX_REPEAT} and the maximum not below the minimum.",
                param="grammar", code="invalid_grammar")


def _strip_literals(grammar: str) -> str:
    """The grammar without its quoted literals and character classes (their braces are text)."""
    no_literals = re.sub(r'"(\\.|[^"\\])*"', '""', grammar)
    return re.sub(r"\[(\\.|[^\]\\])*\]", "[]", no_literals)
