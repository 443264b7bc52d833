"""chat/messages.py: one normaliser, two rule sets (OpenAI's lenient request shapes for HTTP, a
session's history for gRPC); every failure names the field to fix."""

from __future__ import annotations

import pytest

from agentserve.chat.messages import OPENAI_RULES, SESSION_RULES, normalize_messages
from agentserve.chat.tools import check_tool_choice, normalize_tools
from agentserve.errors import FieldError

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}


def test_openai_rules_map_developer_join_text_parts_and_keep_extra_keys() -> None:
    out = normalize_messages([{"role": "developer", "content": [{"type": "text", "text": "a"}, "b"], "name": "n"},
                              {"role": "assistant", "content": None, "tool_calls": [CALL]},
                              {"role": "tool", "content": "", "tool_call_id": "c1"}], OPENAI_RULES)
    assert out[0] == {"name": "n", "role": "system", "content": "a\nb"}
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert out[2] == {"tool_call_id": "c1", "role": "tool", "content": ""}


def test_an_assistants_refusal_and_responses_style_parts_are_its_text() -> None:
    """What clients send back from OpenAI replies: a refusal part (assistant messages only) and output_text parts."""
    out = normalize_messages([{"role": "user", "content": [{"type": "input_text", "text": "a"}]},
                              {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."},
                                                                {"type": "output_text", "text": "Sorry."}]}],
                             OPENAI_RULES)
    assert [m["content"] for m in out] == ["a", "No.\nSorry."]
    with pytest.raises(FieldError) as info:
        normalize_messages([{"role": "user", "content": [{"type": "refusal", "refusal": "No."}]}], OPENAI_RULES)
    assert info.value.field == "messages[0].content[0].type"


def test_openai_rules_leave_arguments_that_are_not_an_object_as_text() -> None:
    call = {"id": "c1", "function": {"name": "f", "arguments": "[1, 2]"}}
    out = normalize_messages([{"role": "assistant", "tool_calls": [call]}], OPENAI_RULES)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == "[1, 2]"


@pytest.mark.parametrize("messages, field, text", [
    ([{"role": "wizard", "content": "x"}], "messages[0].role", "role must be one of"),
    ([{"role": "user"}], "messages[0].content", "needs content"),
    ([{"role": "user", "content": 5}], "messages[0].content", "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type", "not supported"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls", "only assistant"),
    ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "messages[0].tool_calls[0].function.name",
     "function name"),
])
def test_openai_rules_name_the_field(messages: list, field: str, text: str) -> None:
    with pytest.raises(FieldError, match=text) as info:
        normalize_messages(messages, OPENAI_RULES)
    assert info.value.field == field


@pytest.mark.parametrize("messages, field, text", [
    ([{"role": "developer", "content": "x"}], "messages[0].role",
     r"^messages\[0\]\.role 'developer' is not one of system, user, assistant, tool$"),
    ([{"role": "user", "content": ""}], "messages[0].content", "has no content"),
    ([{"role": "assistant", "content": ""}], "messages[0].content", "needs content or tool_calls"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id", "only for tool"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{no"}}]}],
     "messages[0].tool_calls[0].arguments", "not valid JSON"),
    ([{"role": "user", "content": "x", "token_ids": [1]}], "messages[0].token_ids", "raw-token"),
])
def test_session_rules_keep_a_history_that_renders_again(messages: list, field: str, text: str) -> None:
    with pytest.raises(FieldError, match=text) as info:
        normalize_messages(messages, SESSION_RULES)
    assert info.value.field == field


def test_session_rules_keep_only_what_templates_read_and_check_raw_tokens() -> None:
    out = normalize_messages([{"role": "tool", "content": "r", "tool_call_id": "c1", "extra": 1}], SESSION_RULES)
    assert out == [{"role": "tool", "content": "r", "tool_call_id": "c1"}]
    raw = normalize_messages([{"role": "user", "token_ids": [3, 4]}], SESSION_RULES, raw_tokens=True, vocab_size=10)
    assert raw == [{"role": "user", "token_ids": [3, 4]}]
    with pytest.raises(FieldError, match=r"integers in \[0, 10\)"):
        normalize_messages([{"role": "user", "token_ids": [3, 10]}], SESSION_RULES, raw_tokens=True, vocab_size=10)


def test_tools_and_tool_choice() -> None:
    tools = normalize_tools([{"type": "function", "function": {"name": "f", "description": None}}])
    assert tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                    "properties": {}}}}]
    assert check_tool_choice(tools, None) == "auto"
    assert check_tool_choice(None, None) is None
    with pytest.raises(FieldError, match="which is not in tools"):
        check_tool_choice(tools, {"type": "function", "function": {"name": "g"}})
    with pytest.raises(FieldError, match="needs tools"):
        check_tool_choice(None, "required")


def test_a_duplicate_tool_name_is_named_with_its_index() -> None:
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "get_weather", "b", "get_weather")]
    with pytest.raises(FieldError, match="'get_weather'") as err:
        check_tool_choice(tools, "auto")
    assert err.value.field == "tools[3].function.name"
