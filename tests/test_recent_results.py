"""What agent loops repeat every turn is built once on the host: the tool-call payload and the tool
schemas' check are kept for the last distinct tool lists (grammar/recent_results.py), with the same
results as building them afresh; a failing build is never kept, and the oldest lists leave first."""

from __future__ import annotations

from typing import Any

import pytest

from agentserve.chat import tool_schemas
from agentserve.errors import FieldError
from agentserve.grammar import tool_constraint
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.recent_results import RecentResults

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                                                "required": ["city"]}}}]


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    calls = [0]
    real = module.parse_tools

    def counted(tools: Any) -> Any:
        calls[0] += 1
        return real(tools)

    monkeypatch.setattr(module, "parse_tools", counted)
    return calls


def test_a_repeated_tool_list_builds_its_payload_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tool_constraint, "_RECENT_PAYLOADS", RecentResults(capacity=4))
    calls = _counting(monkeypatch, tool_constraint)
    first = tool_constraint.tool_call_payload(TOOLS, "auto", "hermes")
    again = tool_constraint.tool_call_payload([dict(TOOLS[0])], "auto", "hermes")  # equal JSON, another object
    assert first is not None and again == first and calls[0] == 1
    # Anything else in the key builds afresh: the choice, the format, parallelism, another schema.
    assert tool_constraint.tool_call_payload(TOOLS, "required", "hermes") != first
    assert tool_constraint.tool_call_payload(TOOLS, "auto", "llama3_json") != first
    assert tool_constraint.tool_call_payload(TOOLS, "auto", "hermes", parallel=False) != first
    changed = [{"type": "function", "function": {**TOOLS[0]["function"], "name": "get_forecast"}}]
    assert tool_constraint.tool_call_payload(changed, "auto", "hermes") != first
    assert calls[0] == 5


def test_a_failing_build_is_not_kept_and_the_oldest_lists_leave_first(monkeypatch: pytest.MonkeyPatch) -> None:
    recent: RecentResults[int] = RecentResults(capacity=2)
    builds: list[str] = []

    def build(name: str) -> int:
        builds.append(name)
        return len(builds)

    assert recent.get_or_build(["a"], lambda: build("a")) == 1
    assert recent.get_or_build(["b"], lambda: build("b")) == 2
    assert recent.get_or_build(["a"], lambda: build("a")) == 1  # kept, and now the newest
    assert recent.get_or_build(["c"], lambda: build("c")) == 3  # "b" leaves
    assert recent.get_or_build(["b"], lambda: build("b")) == 4
    assert builds == ["a", "b", "c", "b"]

    def broken() -> int:
        builds.append("broken")
        raise GrammarError("no")

    for _ in range(2):
        with pytest.raises(GrammarError):
            recent.get_or_build(["x"], broken)
    assert builds.count("broken") == 2
    not_json = object()
    assert recent.get_or_build([not_json], lambda: build("object")) == 7
    assert recent.get_or_build([not_json], lambda: build("object")) == 8  # never kept: no JSON key


def test_the_tool_schemas_check_is_kept_only_for_valid_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tool_schemas, "_RECENTLY_VALID", RecentResults(capacity=4))
    calls = _counting(monkeypatch, tool_schemas)
    tool_schemas.check_tool_schemas(TOOLS)
    tool_schemas.check_tool_schemas(TOOLS)
    assert calls[0] == 1
    bad = [TOOLS[0], TOOLS[0]]  # a duplicate tool name
    for _ in range(2):
        with pytest.raises(FieldError):
            tool_schemas.check_tool_schemas(bad)
    assert calls[0] == 3


def test_a_structural_tag_checked_at_the_edge_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentserve.adapters.openai.structured_outputs import checked_structural_tag
    from agentserve.grammar import structural_tag
    from agentserve.grammar.spec import ConstraintSpec

    monkeypatch.setattr(structural_tag, "_RECENT_PAYLOADS", RecentResults(capacity=4))
    builds = [0]
    real = structural_tag.structural_tag_tree

    def counted(tag: Any, where: str = "structural_tag") -> dict:
        builds[0] += 1
        return real(tag, where)

    monkeypatch.setattr(structural_tag, "structural_tag_tree", counted)
    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<function="], "tags": [
        {"begin": "<function=get_weather>", "content": {"type": "json_schema", "json_schema": TOOLS[0]["function"][
            "parameters"]}, "end": "</function>"}]}}
    assert checked_structural_tag(tag, "response_format") is tag
    spec = ConstraintSpec.structural_tag(tag)
    assert builds[0] == 1 and spec.payload == structural_tag.structural_tag_payload(tag)
    broken = {"type": "structural_tag", "format": {"type": "nope"}}
    for _ in range(2):  # an error names its own field each time: never kept
        with pytest.raises(Exception, match="response_format"):
            checked_structural_tag(broken, "response_format")
    assert builds[0] == 3
