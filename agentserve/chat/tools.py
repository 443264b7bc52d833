"""Tool declarations and tool_choice in OpenAI's shapes, checked before any rendering: one
implementation for the HTTP adapter and sessions. (Their parameter schemas are checked against what
the grammar compiles in chat/tool_schemas.py, which imports the grammar package.)"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from agentserve.errors import FieldError

Tool = dict[str, Any]
TOOL_CHOICE_MODES = ("none", "auto", "required")


def normalize_tools(tools: Optional[Sequence[Tool]]) -> Optional[list[Tool]]:
    """Validates OpenAI-style tools ({"type": "function", "function": {name, description, parameters}});
    returns them as chat templates take them (parameters always an object schema), or None for none."""
    if not tools:
        return None
    out = []
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise FieldError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise FieldError(f"tools[{i}].name must be a non-empty string", f"tools[{i}].function.name")
        if name in names:
            raise FieldError(f"tools[{i}].name {name!r} is declared twice", f"tools[{i}].function.name")
        names.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise FieldError(f"tools[{i}] ({name}): parameters must be a JSON object schema",
                             f"tools[{i}].function.parameters")
        entry = dict(fn)  # the client's key order: templates serialise the tools as given
        entry["parameters"] = params
        if entry.get("description") is None:
            entry.pop("description", None)
        out.append({"type": "function", "function": entry})
    return out


def _named_function(choice: dict[str, Any], names: list[str]) -> None:
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type", "function") != "function" or not isinstance(name, str):
        raise FieldError("tool_choice must name a function: {'type': 'function', 'function': {'name': ...}}",
                         "tool_choice")
    if name not in names:
        raise FieldError(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")


def _allowed_tools(choice: dict[str, Any], names: list[str]) -> None:
    """{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}} (Chat Completions; the Responses
    API puts mode and tools inline): a subset of the declared tools the reply may call."""
    nested = choice.get("allowed_tools")
    spec: dict[str, Any] = nested if isinstance(nested, dict) else choice
    field = "tool_choice.allowed_tools" if spec is not choice else "tool_choice"
    if spec.get("mode", "auto") not in ("auto", "required"):
        raise FieldError(f"{field}.mode must be 'auto' or 'required'; got {spec.get('mode')!r}", f"{field}.mode")
    entries = spec.get("tools")
    if not isinstance(entries, list) or not entries:
        raise FieldError(f"{field}.tools must be a non-empty list of {{'type': 'function', 'function': "
                         "{'name': ...}}", f"{field}.tools")
    for j, entry in enumerate(entries):
        fn = entry.get("function") if isinstance(entry, dict) and isinstance(entry.get("function"), dict) else entry
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise FieldError(f"{field}.tools[{j}] names {name!r}, which is not in tools", f"{field}.tools[{j}]")


def check_tool_choice(tools: Optional[list[Tool]], choice: Any) -> Any:
    """OpenAI's tool_choice against the declared tools; returns it with its default ("auto" when
    tools are given)."""
    names = [t["function"]["name"] for t in tools or []]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise FieldError(f"tools[{i}].function.name {name!r} is declared twice (also tools[{names.index(name)}]); "
                             "each function needs a name of its own", f"tools[{i}].function.name")
    if isinstance(choice, str) and choice not in TOOL_CHOICE_MODES:
        raise FieldError("tool_choice must be 'none', 'auto', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}; got {choice!r}", "tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        _allowed_tools(choice, names)
    elif isinstance(choice, dict):
        _named_function(choice, names)
    if choice not in (None, "none") and not tools:
        raise FieldError("tool_choice needs tools", "tool_choice")
    if tools and choice is None:
        return "auto"
    return choice
