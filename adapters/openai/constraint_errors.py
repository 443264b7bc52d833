"""The HTTP error of a request that failed inside the engine, and which request field an output-constraint
failure is about (the error's `param`).

A constraint that does not compile fails its request with a message (RequestOutput.error) that the
engine writes; the HTTP layer knows which field the constraint came from. The compile names the
tool when a tool's parameters are at fault (grammar/compiler.py: `the parameters of tool "NAME"`).
"""

from __future__ import annotations

import json
import re
from typing import Optional, Sequence, Union

from agentserve.adapters.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, ToolDefinition
from agentserve.adapters.openai.structured_outputs import request_constraint_fields
from agentserve.errors import FailureKind

# The engine's text for a compile failure (engine/constraints.py, ConstraintManager.attach).
COMPILE_FAILED = "the output constraint could not be compiled"
_TOOL_NAMED = re.compile(r'the parameters of tool ("(?:[^"\\]|\\.)*")')


def _tool_index(tools: Sequence[ToolDefinition], name: str) -> Optional[int]:
    for i, tool in enumerate(tools):
        if tool.function.name == name:
            return i
    return None


def given_constraint_field(req: Union[ChatCompletionRequest, CompletionRequest]) -> Optional[str]:
    """The request field that gave its output constraint (vLLM's guided_* and structured_outputs.*, the
    structural tag), None when the constraint (if any) comes from response_format or the tools. A request
    gives at most one (structured_outputs.constraint_kwargs refuses more)."""
    return next((name for _, name, value in request_constraint_fields(req) if value is not None and value is not False),
                None)


def constraint_param(req: Union[ChatCompletionRequest, CompletionRequest], message: str) -> Optional[str]:
    """The field of `req` that a constraint compile error is about, or None when `message` is not a
    constraint compile error."""
    if COMPILE_FAILED not in message:
        return None
    given = given_constraint_field(req)
    if given is not None:
        return given
    rf = req.response_format
    if rf is not None and rf.type in ("json_object", "structural_tag"):
        return "response_format"
    if rf is not None and rf.type == "json_schema":
        return "response_format.json_schema.schema"
    tools = req.tools if isinstance(req, ChatCompletionRequest) else None
    if not tools:
        return None
    named = _TOOL_NAMED.search(message)
    if named is not None:
        index = _tool_index(tools, json.loads(named.group(1)))
        if index is not None:
            return f"tools[{index}].function.parameters"
    return "tools"


def request_failure(message: str, kind: FailureKind, req: Union[ChatCompletionRequest, CompletionRequest],
                    message_param: Optional[str]) -> OpenAIError:
    """A request failed alone: by its own input (400 naming the field: the constraint's, else
    `message_param`, the field the message starts with) or by a fault of the server's (500; the engine
    logged it with the request's id)."""
    if kind is FailureKind.INVALID_REQUEST:
        return OpenAIError(400, message, param=constraint_param(req, message) or message_param)
    return OpenAIError(500, message)
