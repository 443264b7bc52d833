"""OpenAI's legacy function calling on chat completions (before tools), both ways.

Requests: `functions` / `function_call` are tools / tool_choice (a named `function_call` forces that
function); a conversation's legacy messages, an assistant's `function_call` and a `function` message
with the result, are the tool call and tool message chat templates render (ids made up from the call's
position, the same on every request, so the prefix cache finds a conversation's earlier turns; 9
alphanumeric characters, which every supported template takes).

Replies to a request with `functions`: one call at most, as `message.function_call` `{"name",
"arguments"}` (streamed as `delta.function_call`, the name first, then argument fragments), and
finish_reason "function_call" where tools say "tool_calls": what clients of the legacy API read.
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.adapters.openai.protocol import ChatCompletionRequest, OpenAIError

Message = dict[str, Any]
Tools = Optional[list[dict[str, Any]]]


def legacy_tools(req: ChatCompletionRequest) -> tuple[Tools, Any]:
    """The pre-tools fields `functions` / `function_call` as tools / tool_choice (never ignored;
    mixed with tools they are refused)."""
    for legacy, current in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(req, legacy) is not None and getattr(req, current) is not None:
            raise OpenAIError(400, f"{legacy} is the legacy form of {current}: give one of them", param=legacy)
    if req.function_call not in (None, "none") and not req.functions:
        raise OpenAIError(400, "function_call needs functions", param="function_call")
    tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions or ()]
    choice = req.function_call
    if isinstance(choice, dict):
        if not isinstance(choice.get("name"), str):
            raise OpenAIError(400, "function_call must be 'none', 'auto' or {'name': ...}", param="function_call")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools or None, choice


def _call_id(position: int) -> str:
    return f"fn{position:07d}"


def legacy_messages(messages: list[Message]) -> list[Message]:
    """The messages with legacy function calls and results in the tools form (others as they are)."""
    if not any(isinstance(m, dict) and (m.get("role") == "function" or m.get("function_call") is not None)
               for m in messages):
        return messages
    out: list[Message] = []
    calls = 0
    unanswered: list[tuple[str, str]] = []  # (call id, function name) of calls without a result yet
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        call = m.get("function_call")
        if m.get("role") == "assistant" and call is not None:
            if m.get("tool_calls"):
                raise OpenAIError(400, f"messages[{i}]: give function_call (legacy) or tool_calls, not both",
                                  param=f"messages[{i}].function_call")
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise OpenAIError(400, f"messages[{i}].function_call must be {{'name': ..., 'arguments': ...}}",
                                  param=f"messages[{i}].function_call")
            call_id = _call_id(calls)
            calls += 1
            unanswered.append((call_id, call["name"]))
            m = {k: v for k, v in m.items() if k != "function_call"}
            m["tool_calls"] = [{"id": call_id, "type": "function",
                                "function": {"name": call["name"], "arguments": call.get("arguments", "{}")}}]
        elif m.get("role") == "function":
            name = m.get("name")
            if not isinstance(name, str) or not name:
                raise OpenAIError(400, f"messages[{i}]: a function message needs the function's name",
                                  param=f"messages[{i}].name")
            # The result answers the latest unanswered call of that function (a result without one keeps a
            # made-up id: templates that check ids see it as it came).
            match = next((k for k in range(len(unanswered) - 1, -1, -1) if unanswered[k][1] == name), None)
            call_id = unanswered.pop(match)[0] if match is not None else _call_id(10**6 + i)
            # OpenAI lets a function message's content be null: an empty result.
            content = m.get("content")
            m = {"role": "tool", "tool_call_id": call_id, "name": name, "content": "" if content is None else content}
        out.append(m)
    return out


def legacy_message(message: Message) -> Message:
    """A reply's message with its (first) tool call as `function_call`."""
    calls = message.pop("tool_calls", None)
    if calls:
        fn = calls[0]["function"]
        message["function_call"] = {"name": fn["name"], "arguments": fn["arguments"]}
    return message


def legacy_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """A stream delta with its tool-call fragment as a `function_call` fragment."""
    calls = delta.get("tool_calls")
    if not calls:
        return delta
    fn = calls[0].get("function") or {}
    fragment = {"name": fn["name"], "arguments": fn.get("arguments", "")} if "id" in calls[0] \
        else {"arguments": fn.get("arguments", "")}
    return {**{k: v for k, v in delta.items() if k != "tool_calls"}, "function_call": fragment}
