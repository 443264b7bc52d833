"""A Messages API request read as the chat completion it means. Every shape is checked here, with Anthropic's
field names in the error (`messages[2].content[0].tool_use_id`), so that the chat endpoint only sees
well-formed chat messages:

- `system` (a string or text blocks) is the system message;
- a user message's text blocks are its content; each `tool_result` block is a tool message (the call's id,
  its text), in the order the blocks come;
- an assistant message's `text` blocks are its content, `thinking` blocks its reasoning_content (the template
  of a thinking model renders it; `redacted_thinking` holds nothing readable and is dropped), `tool_use`
  blocks its tool calls (`input` is the arguments object);
- `tools` (custom tools: name, description, input_schema) are function tools; `tool_choice` auto / any / tool
  / none is auto / required / that function / none, and `disable_parallel_tool_use` asks for one call;
- `thinking` (enabled, adaptive, between_tools: on; disabled: off) switches the template's enable_thinking
  (Qwen3's switch; templates ignore variables they do not read), `output_config.effort` is its reasoning_effort;
  an enabled block's `budget_tokens` bounds the reasoning (thinking_token_budget; with a reasoning parser);
- `output_config.format` (a JSON schema) is the json_schema response_format: the reply is constrained to it;
- `stop_sequences` are stop strings; temperature, top_p, top_k (which older clients send) carry over;
- a final assistant message is a prefill: the reply continues it (continue_final_message), and holds only
  what the model added.

Images and documents are refused (the served models take text), as are Anthropic's own tool types (bash,
text editor, web search, ...), which have no schema to constrain a call with. `cache_control` marks are
accepted and ignored: the prefix cache keeps every prompt's pages without being asked.
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.adapters.anthropic.protocol import CountTokensRequest, MessagesRequest
from agentserve.adapters.openai.protocol import OpenAIError


def _bad(message: str, field: str) -> OpenAIError:
    return OpenAIError(400, message, param=field)


def _blocks(content: Any, at: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{at}: content must be a string or a list of content blocks", at)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{at}[{j}]: a content block must be an object with a type", f"{at}[{j}]")
    return content


def _text(block: dict[str, Any], at: str, key: str = "text") -> str:
    text = block.get(key)
    if not isinstance(text, str):
        raise _bad(f"{at}.{key} must be a string", f"{at}.{key}")
    return text


def _unsupported(block: dict[str, Any], at: str, role: str) -> OpenAIError:
    kind = block["type"]
    if kind in ("image", "document", "search_result", "container_upload"):
        return _bad(f"{at}: {kind} blocks are not supported (this model takes text only)", f"{at}.type")
    return _bad(f"{at}: a {role} message's content blocks are text{', tool_result' if role == 'user' else ''}"
                f"{', tool_use, thinking' if role == 'assistant' else ''}; got {kind!r}", f"{at}.type")


def _text_of_blocks(content: Any, at: str, what: str) -> str:
    """Content that may only be text (a system prompt, a tool result): a string, or text blocks joined by
    newlines."""
    texts = []
    for j, block in enumerate(_blocks(content, at)):
        if block["type"] != "text":
            raise _unsupported(block, f"{at}[{j}]", what)
        texts.append(_text(block, f"{at}[{j}]"))
    return "\n".join(texts)


def _user_messages(blocks: list[dict[str, Any]], at: str) -> list[dict[str, Any]]:
    """One user turn's blocks as chat messages: tool results become tool messages, runs of text a user one."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        where = f"{at}.content[{j}]"
        if block["type"] == "text":
            texts.append(_text(block, where))
        elif block["type"] == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}.tool_use_id is required: the id of the tool_use block this answers",
                           f"{where}.tool_use_id")
            content = _text_of_blocks(block.get("content", ""), f"{where}.content", "tool result")
            out.append({"role": "tool", "tool_call_id": call_id, "content": content})
        else:
            raise _unsupported(block, where, "user")
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant_message(blocks: list[dict[str, Any]], at: str) -> dict[str, Any]:
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(blocks):
        where = f"{at}.content[{j}]"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "thinking":
            thoughts.append(_text(block, where, "thinking"))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            name, call_id, arguments = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not name:
                raise _bad(f"{where}.name is required: the tool the call is for", f"{where}.name")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}.id is required: tool results name the call by it", f"{where}.id")
            if not isinstance(arguments, dict):
                raise _bad(f"{where}.input must be an object (the tool's arguments)", f"{where}.input")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        else:
            raise _unsupported(block, where, "assistant")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    if message["content"] is None and not thoughts and not calls:
        message["content"] = ""
    return message


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system is not None and req.system != []:  # a string (even ""), or text blocks
        out.append({"role": "system", "content": _text_of_blocks(req.system, "system", "system")})
    if not req.messages:
        raise _bad("messages: at least one message is required", "messages")
    turns: list[tuple[str, list[dict[str, Any]], str]] = []  # (role, blocks, where the turn starts)
    for i, m in enumerate(req.messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"{at}.role must be 'user' or 'assistant' (the system prompt goes in the top-level system "
                       "field)", f"{at}.role")
        blocks = _blocks(m.get("content"), f"{at}.content")
        check = _user_messages if m["role"] == "user" else _assistant_message
        check(blocks, at)  # a bad block is named in its own message, before the turn's blocks are joined
        if turns and turns[-1][0] == m["role"]:  # Anthropic: consecutive same-role messages are one turn
            turns[-1] = (m["role"], turns[-1][1] + blocks, turns[-1][2])
        else:
            turns.append((m["role"], list(blocks), at))
    for role, blocks, at in turns:
        out += _user_messages(blocks, at) if role == "user" else [_assistant_message(blocks, at)]
    return out


def chat_tools(tools: Optional[list[Any]]) -> Optional[list[dict[str, Any]]]:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{at} must be an object (name, description, input_schema)", at)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"{at}: {kind!r} is one of Anthropic's own tools, which this server does not run; declare it as "
                       "a custom tool (name, description, input_schema)", f"{at}.type")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad(f"{at}.name is required", f"{at}.name")
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema is required: a JSON schema object for the tool's input",
                       f"{at}.input_schema")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Optional[dict[str, Any]], tools: Optional[list[Any]]) -> tuple[Any, bool]:
    """(the chat tool_choice, whether parallel calls are allowed)."""
    if choice is None:
        return (None, True)
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice.name is required with type 'tool'", "tool_choice.name")
        return ({"type": "function", "function": {"name": name}}, parallel)
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind) if isinstance(kind, str) else None
    if mapped is None:
        raise _bad(f"tool_choice.type must be 'auto', 'any', 'tool' or 'none'; got {kind!r}", "tool_choice.type")
    if mapped == "required" and not tools:
        raise _bad("tool_choice 'any' needs tools", "tool_choice")
    return (mapped, parallel)


def template_kwargs(thinking: Optional[dict[str, Any]], output_config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The chat-template variables: enable_thinking from `thinking` (enabled, adaptive and between_tools think),
    reasoning_effort from output_config.effort."""
    kwargs: dict[str, Any] = {}
    if thinking is not None:
        kind = thinking.get("type")
        if kind not in ("enabled", "adaptive", "between_tools", "disabled"):
            raise _bad(f"thinking.type must be 'enabled', 'adaptive', 'between_tools' or 'disabled'; got {kind!r}",
                       "thinking.type")
        kwargs["enable_thinking"] = kind != "disabled"
    effort = (output_config or {}).get("effort")
    if effort is not None:
        kwargs["reasoning_effort"] = effort
    return kwargs


def thinking_budget(thinking: Optional[dict[str, Any]]) -> Optional[int]:
    """thinking.budget_tokens of an enabled block (the reasoning's most tokens: vLLM's thinking_token_budget)."""
    if thinking is None or thinking.get("type") != "enabled" or "budget_tokens" not in thinking:
        return None
    budget = thinking["budget_tokens"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise _bad(f"thinking.budget_tokens must be a non-negative integer, got {budget!r}", "thinking.budget_tokens")
    return budget


def response_format(output_config: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """output_config.format (a JSON schema the reply must match) as the chat response_format."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _bad("output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}", "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def _prefill(messages: list[dict[str, Any]]) -> bool:
    """Whether the conversation ends with the start of the reply (Anthropic's prefill: a final assistant message
    the model continues, say "{" before a JSON answer). It is text: a reply does not continue a tool call."""
    last = messages[-1]
    if last["role"] != "assistant":
        return False
    if last.get("tool_calls") or last.get("reasoning_content"):
        raise _bad("the final assistant message (a prefill the reply continues) may hold text only: end the "
                   "conversation with a user message to answer tool calls", "messages")
    return True


def chat_request_fields(req: CountTokensRequest) -> dict[str, Any]:
    """The ChatCompletionRequest fields that decide the prompt (messages, tools, template variables)."""
    tools = chat_tools(req.tools)
    choice, parallel = chat_tool_choice(req.tool_choice, req.tools)
    messages = chat_messages(req)
    prefill = _prefill(messages)
    fields: dict[str, Any] = {"model": req.model, "messages": messages, "tools": tools,
                              "tool_choice": choice, "parallel_tool_calls": parallel,
                              "chat_template_kwargs": template_kwargs(req.thinking, req.output_config) or None,
                              "add_generation_prompt": not prefill, "continue_final_message": prefill}
    return {k: v for k, v in fields.items() if v is not None}


def chat_generation_fields(req: MessagesRequest) -> dict[str, Any]:
    """The sampling fields of a message request, in the chat request's names."""
    if req.max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    fields: dict[str, Any] = {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                              "top_k": req.top_k, "stop": req.stop_sequences, "stream": req.stream,
                              "response_format": response_format(req.output_config),
                              "thinking_token_budget": thinking_budget(req.thinking)}
    if req.stream:  # the usage of every chunk: message_start carries the prompt's tokens, message_delta the output's
        fields["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return {k: v for k, v in fields.items() if v is not None}
