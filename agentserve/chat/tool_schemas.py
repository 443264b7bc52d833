"""Tool parameter schemas checked as the grammar package will compile them (dialects such as
"type": "dict" are fine), so that a tool the grammar cannot constrain is a 400 naming the keyword and
its path, not a failed request later. Apart from chat/tools.py because it imports the grammar package
(and torch with it), which message and template handling must not."""

from __future__ import annotations

import re
from typing import Any

from agentserve.errors import FieldError
from agentserve.grammar.recent_results import RecentResults
from agentserve.grammar.tool_constraint import parse_tools

_TOOL_PATH = re.compile(r"(tools\[\d+\][\w.\[\]$]*)")
# Tool lists already found valid (an agent loop sends the same one every turn; the check parses every
# schema: ~2 ms for 20 real tools).
_RECENTLY_VALID: RecentResults[bool] = RecentResults(capacity=64)


def check_tool_schemas(tools: list[dict[str, Any]]) -> None:
    def parses() -> bool:
        parse_tools(tools)
        return True

    try:
        _RECENTLY_VALID.get_or_build(tools, parses)
    except ValueError as e:
        msg = str(e)
        match = _TOOL_PATH.search(msg)
        raise FieldError(f"unsupported tool definition: {msg}", match.group(1) if match else "tools") from None
