"""Strings a constraint forces that hold the text of an added token, refused for llguidance.

llguidance writes text the grammar forces (a const or enum string, a property name, a tool's name)
with the tokenizer, which spells '<|im_start|>' or '<tool_call>' as that one added token; its mask then
allows only that token, and consuming it fails (an added token never matches text inside a JSON
string), so the request failed in the step. Refusing such a constraint at compile time names the
string instead; xgrammar and outlines write the same text with ordinary tokens.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from agentserve.grammar.interface import GrammarError


def _forced_strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(string, where) for each const / enum string, property name and required name of a schema, or of
    the schemas inside a tool-call structure."""
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
    for key, value in node.items():
        yield from _forced_strings(value, f"{path}.{key}")


def check_forced_text(constraint: Any, added_texts: Sequence[str], backend: str) -> None:
    """GrammarError when a string the constraint forces contains one of `added_texts`."""
    if not added_texts:
        return
    for text, where in _forced_strings(constraint, "$"):
        for added in added_texts:
            if added in text:
                raise GrammarError(f"{backend} cannot write the string {text!r} (at {where}): it contains the "
                                   f"text of the added token {added!r}, which {backend} can only emit as that "
                                   "token, never as text")
