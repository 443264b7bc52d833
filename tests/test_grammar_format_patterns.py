"""Formats that xgrammar and outlines-core wrote wrong, now written with patterns whose every match is
valid: xgrammar's ipv4 allowed octets past 255 and leading zeros ("426.904.30.98", "07.22.091.30"; Python's
ipaddress and jsonschema's format checker refuse them); xgrammar's and outlines-core's dates allowed days
past their month's end ("4167-02-31"); outlines dropped ipv4 (any string)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
import re

import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.registry import get_backend
from agentserve.grammar.schema_utils import FULL_DATE_REGEX
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


def test_the_date_regex_knows_each_months_length() -> None:
    day = datetime.date(2023, 1, 1)  # not a leap year: February has 28 days
    while day.year == 2023:
        assert re.fullmatch(FULL_DATE_REGEX, day.isoformat()), day
        day += datetime.timedelta(days=1)
    for wrong in ("2023-02-29", "2023-02-30", "2023-04-31", "2023-13-01", "2023-00-10", "2023-06-00"):
        assert not re.fullmatch(FULL_DATE_REGEX, wrong), wrong
