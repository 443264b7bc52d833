"""outlines-core's Rust regex reads `\\d` and `\\w` as Unicode classes: `"pattern": "^\\d{6}$"` came out as
"४６9꧘6４" and `format: date` as "꧘6４4-05-05", which JSON Schema's ECMA-262 patterns (ASCII `\\d`) and
JavaScript validators refuse; its date-time and time had no UTC offset (RFC 3339 requires one) and
years of any length. Outputs now use ASCII digits and word characters, and RFC 3339 dates and times.
A pattern's class, '.' or `\\D` let a string hold a raw '"' or control character (invalid JSON:
'{"k":"x"y"}'); those now stay within what a JSON string holds unescaped, and a pattern that spells such a
character itself is refused, naming where."""

from __future__ import annotations

import datetime
import json
import random
import re

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.outlines_patterns import ascii_class_escapes
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

pytestmark = pytest.mark.skipif("outlines" not in available_backends(), reason="outlines-core not installed")


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    info = tokenizer_info_for(tiny_model_cached("qwen2"))[1]  # holds tokens of non-ASCII digits (४, ６, ꧘)
    return GrammarCompiler(get_backend("outlines"), info, timeout_s=30.0)


def _values(compiler: GrammarCompiler, spec: ConstraintSpec, seeds: int = 12) -> list[str]:
    compiled = compiler.compile(spec)
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=80) for s in range(seeds)]
    texts = [decode(compiled.tokenizer_info, w.tokens) for w in walks if w.finished]
    assert texts
    return texts


# (pattern, matched as ECMA-262 reads it: ASCII \d and \w; Python's Unicode reading is jsonschema's)
@pytest.mark.parametrize("pattern, ascii_reading", [
    (r"^\d{6}$", True), (r"^[\d]{6}$", True), (r"^\w{6}$", True), (r"^a\D\Wb$", False), (r"^[^,]{3}$", True),
    (r"^x.\S\sy$", False), (r"^[ -~]{4}$", True)])
def test_pattern_outputs_are_json_and_match(compiler: GrammarCompiler, pattern: str, ascii_reading: bool) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "string", "pattern": pattern}}, "required": ["k"]}
    for text in _values(compiler, ConstraintSpec.json_schema(schema), seeds=16):
        value = json.loads(text)  # a raw '"' or control character fails here
        jsonschema.validate(value, schema)
        if ascii_reading:
            assert re.search(pattern, value["k"], flags=re.ASCII), value


@pytest.mark.parametrize("pattern, written", [('^a"b$', '"'), (r"^a\"b$", r"\""), (r"^a\\b$", r"\\"), (r"^a\nb$", r"\n"),
                                              (r"^a\x0ab$", r"\x0a"), (r"^a\u005Cb$", r"\u005C")])
def test_a_pattern_that_spells_a_json_escape_is_refused(compiler: GrammarCompiler, pattern: str, written: str) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "string", "pattern": pattern}}, "required": ["k"]}
    with pytest.raises(GrammarError, match=re.escape(f"cannot write {written!r} of the pattern at properties.k.pattern")):
        compiler.compile(ConstraintSpec.json_schema(schema))


@pytest.mark.parametrize("fmt, parse", [("date", datetime.date.fromisoformat),
                                        ("date-time", datetime.datetime.fromisoformat),
                                        ("time", datetime.time.fromisoformat)])
def test_dates_and_times_are_rfc3339(compiler: GrammarCompiler, fmt: str, parse) -> None:
    for text in _values(compiler, ConstraintSpec.json_schema({"type": "string", "format": fmt})):
        value = json.loads(text)
        assert value.isascii(), value
        if fmt != "time":  # a day past its month's end (02-30) is not checked: no backend's regex checks it
            value = value[:8] + "01" + value[10:]
        parse(value)  # raises on a year of more than 4 digits, a missing field, ...
        if fmt != "date":
            assert re.search(r"(Z|[+-]\d\d:\d\d)$", value), f"{value!r} has no UTC offset"


def test_a_regex_constraint_reads_class_escapes_as_ascii(compiler: GrammarCompiler) -> None:
    for text in _values(compiler, ConstraintSpec.regex(r"\d{3}-\w{2}")):
        assert re.fullmatch(r"\d{3}-\w{2}", text, flags=re.ASCII), text


@pytest.mark.parametrize("regex, ascii_regex", [
    (r"^\d{4}-\d\d$", "^[0-9]{4}-[0-9][0-9]$"), (r"[\d.]+", "[0-9.]+"), (r"[^\d]", "[^0-9]"),
    (r"\D\w", r"\D[A-Za-z0-9_]"), (r"\\d", r"\\d"), (r"[]\d]", "[]0-9]"), (r"[^\D]", r"[^\D]"),
])
def test_ascii_class_escapes(regex: str, ascii_regex: str) -> None:
    assert ascii_class_escapes(regex) == ascii_regex


def test_uri_outputs_are_json(compiler: GrammarCompiler) -> None:
    # outlines-core's uri regex ('urn:...:[^\s]+') let raw control characters and '"' in: 10 of 11 invalid
    schema = {"type": "object", "properties": {"k": {"type": "string", "format": "uri"}}, "required": ["k"]}
    for text in _values(compiler, ConstraintSpec.json_schema(schema), seeds=40):
        assert json.loads(text)["k"].startswith(("http", "ftp", "urn:")), text  # a raw control character fails here


def test_an_email_cannot_open_a_quoted_local_part(compiler: GrammarCompiler) -> None:
    # outlines-core's email regex allows '"a b"@c.d': its first '"' would end the JSON string early
    schema = {"type": "object", "properties": {"k": {"type": "string", "format": "email"}}, "required": ["k"]}
    compiled = compiler.compile(ConstraintSpec.json_schema(schema))
    info = compiled.tokenizer_info
    matcher = compiled.new_matcher()
    for byte in b'{"k":"':
        assert matcher.accept_token(info.token_bytes.index(bytes([byte])))
    assert not matcher.accept_token(info.token_bytes.index(b'"'))  # an empty email is no email either
    assert matcher.accept_token(info.token_bytes.index(b"a"))


@pytest.mark.parametrize("schema, key, where", [
    ({"type": "object", "properties": {'a"b': {"type": "integer"}}, "required": ['a"b']}, 'a"b', "properties"),
    ({"type": "object", "properties": {"k": {"const": {'q"': 1}}}, "required": ["k"]}, 'q"', "properties.k.const"),
    ({"enum": [{"a\\b": 1}]}, "a\\b", "enum"),
])
def test_an_object_key_with_a_quote_or_backslash_is_refused(compiler: GrammarCompiler, schema: dict, key: str,
                                                            where: str) -> None:
    # outlines-core wrote '{"a"b": 1}' (invalid JSON), and 'a\b' failed with a message about DFAs
    with pytest.raises(GrammarError, match=re.escape(f"cannot write the object key {key!r} (at {where})")):
        compiler.compile(ConstraintSpec.json_schema(schema))


def test_string_values_with_quotes_and_backslashes_still_compile(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"k": {"enum": ['a"b', "c\\d", {"a": 'x"y\\'}]}}, "required": ["k"]}
    for text in _values(compiler, ConstraintSpec.json_schema(schema)):
        jsonschema.validate(json.loads(text), schema)
