"""Strings a constraint forces that hold the text of an added token, refused for llguidance.

llguidance writes text the grammar forces (a const or enum string, a property name, a tool's name, the
literal part of a `pattern` or of a regex, a choice, a grammar's quoted string) with the tokenizer,
which spells '<|im_start|>' or '<tool_call>' as that one added token; its mask then allows only that
token, and consuming it fails (an added token never matches text), so the request failed in the step.
Refusing such a constraint at compile time names the string instead; xgrammar and outlines write the
same text with ordinary tokens.
"""

from __future__ import annotations

import json
import re
# The standard library's own regex parser (re.compile's): it finds the literal runs of a pattern, in
# whatever spelling ('<', '[<]', '\x3c', '(<tool_call>)'), which a scan of the pattern's text would miss.
# typeshed declares it only under its deprecated top-level names (sre_parse, sre_constants).
from re import _constants as sre_constants, _parser as sre_parser  # type: ignore[attr-defined]
from typing import Any, Iterator, Sequence

from agentserve.grammar.interface import GrammarError
from agentserve.grammar.spec import ConstraintSpec

_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)
# A quoted string of a Lark or GBNF grammar.
_GRAMMAR_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')


def _without_groups(items: Any) -> Iterator[tuple[Any, Any]]:
    """A parsed regex's items with its groups opened: a group matches its contents in sequence."""
    for op, av in items:
        if op is sre_constants.SUBPATTERN:
            yield from _without_groups(av[-1])
        else:
            yield op, av


def _literal_runs(items: Any) -> tuple[list[str], bool]:
    """(runs, all_literal): the texts of the consecutive literal characters of a parsed regex (through
    groups and repeats; each branch on its own), and whether the whole sequence is literal (then `runs`
    is its one text)."""
    runs: list[str] = []
    current = ""
    all_literal = True
    for op, av in _without_groups(items):
        if op is sre_constants.LITERAL:
            current += chr(av)
            continue
        if op is sre_constants.AT:  # anchors match no text
            continue
        if op in _REPEATS:
            low, high, body = av
            inner, literal = _literal_runs(body)
            text = "".join(inner) if literal else ""
            if literal and low == high:
                current += text * low
                continue
            if low > 0 and literal:  # written at least once, right after what came before
                current += text
            runs.append(current)
            runs.extend(inner)
        else:
            runs.append(current)
            if op is sre_constants.BRANCH:
                for alternative in av[1]:
                    runs.extend(_literal_runs(alternative)[0])
        all_literal = False
        current = ""
    runs.append(current)
    return ([r for r in runs if r] if not all_literal else ["".join(runs)]), all_literal


def pattern_literal_runs(pattern: str) -> list[str]:
    """The texts a regex writes character for character; the pattern itself, unescaped, when Python's
    parser does not read it (an ECMA-only construct), so a literal spelled plainly is still found."""
    try:
        return _literal_runs(sre_parser.parse(pattern))[0]
    except (re.error, OverflowError, RecursionError):
        return [pattern.replace("\\", "")]


def _forced_strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(string, where) for each const / enum string, property name, required name and literal run of a
    pattern (of a string or of patternProperties) of a schema, or of the schemas inside a tool-call
    structure."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _forced_strings(item, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("const"), str):
        yield node["const"], f"{path}.const"
    for key in ("enum", "required"):
        values = node.get(key)
        if isinstance(values, list):
            yield from ((v, f"{path}.{key}") for v in values if isinstance(v, str))
    props = node.get("properties")
    if isinstance(props, dict):
        yield from ((name, f"{path}.properties") for name in props)
    if isinstance(node.get("pattern"), str):
        yield from ((run, f"{path}.pattern") for run in pattern_literal_runs(node["pattern"]))
    pattern_props = node.get("patternProperties")
    if isinstance(pattern_props, dict):
        for pattern in pattern_props:
            yield from ((run, f"{path}.patternProperties") for run in pattern_literal_runs(pattern))
    for key, value in node.items():
        yield from _forced_strings(value, f"{path}.{key}")


def _grammar_strings(text: str) -> Iterator[str]:
    for match in _GRAMMAR_STRING.finditer(text):
        try:
            yield json.loads(match.group(0))
        except ValueError:  # an escape JSON does not know: its text as written
            yield match.group(1)


def _spec_forced_strings(spec: ConstraintSpec) -> Iterator[tuple[str, str]]:
    if spec.kind in ("json_schema", "tool_calls", "structural_tag"):
        yield from _forced_strings(json.loads(str(spec.payload)), "$")
    elif spec.kind == "regex":
        yield from ((run, "the regex") for run in pattern_literal_runs(str(spec.payload)))
    elif spec.kind == "choice":
        yield from ((choice, f"choice[{i}]") for i, choice in enumerate(spec.payload))
    elif spec.kind == "grammar":
        yield from ((s, "a quoted string of the grammar") for s in _grammar_strings(str(spec.payload)))


def check_forced_text(spec: ConstraintSpec, added_texts: Sequence[str], backend: str) -> None:
    """GrammarError when a string the constraint forces contains one of `added_texts`."""
    if not added_texts:
        return
    for text, where in _spec_forced_strings(spec):
        for added in added_texts:
            if added in text:
                raise GrammarError(f"{backend} cannot write the string {text!r} (at {where}): it contains the "
                                   f"text of the added token {added!r}, which {backend} can only emit as that "
                                   "token, never as text")
