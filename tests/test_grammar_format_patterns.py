"""Formats that xgrammar and outlines-core wrote wrong, now written with patterns whose every match is
valid: xgrammar's ipv4 allowed octets past 255 and leading zeros ("426.904.30.98", "07.22.091.30"; Python's
ipaddress and jsonschema's format checker refuse them); xgrammar's and outlines-core's dates allowed days
past their month's end ("4167-02-31"); outlines dropped ipv4 (any string); llguidance's times took a leap
second at any minute ("12:22:60Z", 14% of random date-times), which Python's datetime and pydantic refuse;
xgrammar compiled a pattern's optional group holding a repetition as if its first character were optional on
its own (`^[0-9]{2}(\\.[0-9]+)?$` gave "912066695206"); formats a backend does not implement but
jsonschema's format checker checks (json-pointer, relative-json-pointer, idn-hostname, idn-email) came out as
any string; outlines-core wrote `^a|b$` across the string's quotes ('b"' came out) and refused `^ab`, and
wrote ipv6 as any string."""

from __future__ import annotations

import calendar
import datetime
import ipaddress
import json
import random
import re

import jsonschema
import pytest
from pydantic import TypeAdapter

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.schema_utils import CHECKED_FORMAT_PATTERNS, FULL_DATE_REGEX
from agentserve.grammar.spec import ConstraintSpec
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

BACKENDS = [b for b in ("xgrammar", "outlines", "llguidance") if b in available_backends()]


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


def _values(info, backend: str, fmt: str, seeds: int) -> list[str]:
    schema = {"type": "object", "properties": {"v": {"type": "string", "format": fmt}}, "required": ["v"]}
    compiled = GrammarCompiler(get_backend(backend), info, timeout_s=30.0).compile(ConstraintSpec.json_schema(schema))
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=60) for s in range(seeds)]
    values = [json.loads(decode(info, w.tokens))["v"] for w in walks if w.finished]
    assert values
    return values


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv4_values_are_addresses(info, backend: str) -> None:
    for value in _values(info, backend, "ipv4", seeds=40):  # xgrammar: 9 of 40 were refused before
        ipaddress.IPv4Address(value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["date", "date-time"])
def test_dates_are_calendar_dates(info, backend: str, fmt: str) -> None:
    for value in _values(info, backend, fmt, seeds=60):  # 2 of 40 dates were past their month's end before
        datetime.date.fromisoformat(value[:10])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["time", "date-time"])
def test_times_are_what_python_reads(info, backend: str, fmt: str) -> None:
    kind = datetime.time if fmt == "time" else datetime.datetime
    for value in _values(info, backend, fmt, seeds=60):
        TypeAdapter(kind).validate_python(value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", sorted(CHECKED_FORMAT_PATTERNS))
def test_checked_formats_pass_the_format_checker(info, backend: str, fmt: str) -> None:
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert fmt in checker.checkers  # a format nothing checks would test nothing here
    for value in _values(info, backend, fmt, seeds=30):
        checker.check(value, fmt)


@pytest.mark.parametrize("year", [2023, 2024, 1900, 2000, 2100, 1996])
def test_the_date_regex_knows_each_months_length_and_the_leap_years(year: int) -> None:
    day = datetime.date(year, 1, 1)
    while day.year == year:
        assert re.fullmatch(FULL_DATE_REGEX, day.isoformat()), day
        day += datetime.timedelta(days=1)
    leap = calendar.isleap(year)
    assert bool(re.fullmatch(FULL_DATE_REGEX, f"{year}-02-29")) == leap
    for wrong in ("02-30", "04-31", "13-01", "00-10", "06-00"):
        assert not re.fullmatch(FULL_DATE_REGEX, f"{year}-{wrong}"), wrong


# An optional group holding a repetition, in a value's pattern and in a patternProperties key.
OPTIONAL_GROUPS = {
    "pattern": {"type": "object", "properties": {"v": {"type": "string", "pattern": "^[0-9]{2}(\\.[0-9]+)?$"}},
                "required": ["v"], "additionalProperties": False},
    "key": {"type": "object", "patternProperties": {"^k(\\.x+)?$": {"const": 1}}, "additionalProperties": False,
            "minProperties": 1, "maxProperties": 1},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPTIONAL_GROUPS))
def test_an_optional_group_keeps_its_first_character(info, backend: str, name: str) -> None:
    schema = OPTIONAL_GROUPS[name]
    try:
        compiled = GrammarCompiler(get_backend(backend), info, timeout_s=30.0).compile(ConstraintSpec.json_schema(schema))
    except GrammarError as refused:
        if backend != "outlines":
            raise
        pytest.skip(f"outlines refuses a keyword of the schema, naming it: {refused}")
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=40) for s in range(40)]
    outputs = [json.loads(decode(info, w.tokens)) for w in walks if w.finished]
    assert outputs
    for value in outputs:  # xgrammar: 15 of 23 values of the pattern broke it before
        jsonschema.validate(value, schema)
    assert any("." in (value["v"] if name == "pattern" else next(iter(value))) for value in outputs)


def test_xgrammar_refuses_only_what_it_would_write_unescaped() -> None:
    refused = pytest.importorskip("agentserve.grammar.xgrammar_backend", reason="xgrammar not installed")._json_escaped_literal
    assert refused(r'^[^"\\\x00-\x1F]{0,8}$') is None  # a negated class leaves those characters out
    assert refused(r"^[\x00-\x7f]{2}$") is None and refused(r"^a\.b[\w.-]$") is None
    assert refused(r"^a\\b$") == r"\\" and refused('^a"') == '"' and refused(r"^\u0022$") == r"\u0022"
    assert refused(r"^a\tb$") == r"\t" and refused(r"^[\\/]$") == r"\\"


def test_optional_groups_are_bounded_outside_escapes_and_classes() -> None:
    rewrite = pytest.importorskip("agentserve.grammar.xgrammar_backend", reason="xgrammar not installed")._bounded_optional_groups
    assert rewrite(r"^a(\.b+)?$") == r"^a(\.b+){0,1}$"
    assert rewrite(r"^a\)?b[)?]c(d)??") == r"^a\)?b[)?]c(d){0,1}"
    assert rewrite(r"[]?)]?(x(y+)?)?") == r"[]?)]?(x(y+){0,1}){0,1}"


# JSON Schema patterns are searches: anchors where the pattern has them, text around it where not.
SEARCH_PATTERNS = ["^a|b$", "^ab", "b$", r"^a\$", "^(x|yz)$"]
# Patterns that spell characters a JSON string escapes: xgrammar wrote them raw ('"a"b"', "C:<newline>ab").
ESCAPED_PATTERNS = [r"^C:\\[a-z]{1,3}$", '^a"b$', r"^\x22$", r"^a[\\/]b$", r"^a\tb$"]


def _pattern_outputs(info, backend: str, pattern: str) -> tuple[dict, list[str]]:
    schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": pattern}}, "required": ["v"]}
    compiled = GrammarCompiler(get_backend(backend), info, timeout_s=30.0).compile(ConstraintSpec.json_schema(schema))
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=80, eos_prob=0.9) for s in range(40)]
    return schema, [decode(info, w.tokens) for w in walks if w.finished]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", SEARCH_PATTERNS)
def test_patterns_search_and_outputs_stay_json(info, backend: str, pattern: str) -> None:
    schema, texts = _pattern_outputs(info, backend, pattern)  # outlines refused "^ab"
    if pattern.startswith("^") and pattern.endswith("$") and "|" not in pattern:
        assert texts  # an unanchored end lets a random walk run on past the token cap
    for text in texts:
        jsonschema.validate(json.loads(text), schema)  # outlines wrote '"b"' ... 'b"' for ^a|b$


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ESCAPED_PATTERNS)
def test_escaped_characters_are_written_escaped_or_refused_by_name(info, backend: str, pattern: str) -> None:
    try:
        schema, texts = _pattern_outputs(info, backend, pattern)
    except GrammarError as refused:
        assert backend != "llguidance", refused
        assert "inside a JSON string" in str(refused)
        return
    assert texts
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_values_are_addresses(info, backend: str) -> None:
    for value in _values(info, backend, "ipv6", seeds=30):
        ipaddress.IPv6Address(value)
