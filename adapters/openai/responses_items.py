"""The Responses API's request shapes (POST /v1/responses), turned into what sessions take: input
items into chat messages, Responses tools and tool_choice into their Chat Completions forms,
`text.format` into an output constraint.

Input items (OpenAI's shapes): messages `{"role", "content"}` (with or without `"type": "message"`;
content a string or input_text / output_text parts; "developer" is "system"), `function_call`
`{"call_id", "name", "arguments"}` and `function_call_output` `{"call_id", "output"}`. Consecutive
function calls (and the assistant text right before them) become one assistant message with
`tool_calls`, as chat templates expect. A `reasoning` item (what a reasoning model's earlier response
output, given back by clients that keep the conversation themselves) becomes the `reasoning_content`
of the assistant message after it, as chat templates that show earlier reasoning read it. Anything
else is a 400 naming the item.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from agentserve.adapters.openai.protocol import OpenAIError, StructuredOutputs
from agentserve.adapters.openai.structured_outputs import (
    checked_structural_tag, parsed_schema, structured_outputs_fields)
from agentserve.chat.messages import parse_json_object, text_of_parts
from agentserve.chat.template_kwargs import checked_template_kwargs, with_reasoning_effort
from agentserve.errors import FieldError
from agentserve.grammar.unenforced_keywords import best_effort
from agentserve.sessions.types import ReplyParts

Message = dict[str, Any]
Item = dict[str, Any]


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Unknown fields are accepted and ignored (include, reasoning, prompt_cache_key, ...),
    as OpenAI-compatible servers do; those that would ask for what is not done are refused
    (check_server_state_fields)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]] = ""
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[None, str, dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict[str, Any]] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    store: Optional[bool] = None
    stream: Optional[bool] = None
    background: Optional[bool] = None
    truncation: Optional[str] = None  # "auto": the conversation's oldest turns dropped to fit (responses_truncation.py)
    previous_response_id: Optional[str] = None
    conversation: Union[None, str, dict[str, Any]] = None  # an id, or {"id": ...}: conversations_store.py
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    reasoning: Optional[dict[str, Any]] = None  # {"effort": ...}: the template's reasoning_effort / enable_thinking
    # vLLM extras
    ignore_eos: bool = False
    thinking_token_budget: Optional[int] = None  # needs --reasoning-parser
    top_k: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    logit_bias: Optional[dict[str, float]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    priority: int = 0
    cache_salt: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    structured_outputs: Optional[StructuredOutputs] = None  # vLLM's: json, regex, choice, grammar, json_object
    include_reasoning: bool = True  # False: the thinking is generated but left out of the output
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


# Fields of OpenAI's that point at state kept on OpenAI's side: ignoring one would answer without that state.
_SERVER_STATE_FIELDS = {
    "prompt": "stored prompt templates are not supported: send the instructions and the input themselves",
}


def check_server_state_fields(req: ResponsesRequest) -> None:
    """400 for what would be silently ignored: state kept on OpenAI's side."""
    extra = req.model_extra or {}
    for name, why in _SERVER_STATE_FIELDS.items():
        if extra.get(name) is not None:
            raise OpenAIError(400, f"{name}: {why}", param=name)


def conversation_id(req: ResponsesRequest) -> Optional[str]:
    """The conversation the response belongs to (`conversation`: its id, or an object with it)."""
    conv = req.conversation
    if conv is None:
        return None
    if isinstance(conv, dict):
        conv = conv.get("id")
    if not isinstance(conv, str) or not conv:
        raise OpenAIError(400, "conversation must be a conversation id or {'id': <conversation id>}",
                          param="conversation")
    if req.previous_response_id is not None:
        raise OpenAIError(400, "conversation and previous_response_id are mutually exclusive: give one",
                          param="conversation")
    return conv


def template_kwargs(req: ResponsesRequest) -> dict[str, Any]:
    """The chat-template variables the response's session renders with: `chat_template_kwargs` (vLLM's),
    and `reasoning.effort` as vLLM passes it: `reasoning_effort`, and `enable_thinking` (false for "none")
    unless chat_template_kwargs sets it (Qwen3's switch; templates ignore variables they do not read)."""
    try:
        return checked_template_kwargs(with_reasoning_effort(dict(req.chat_template_kwargs or {}),
                                                             (req.reasoning or {}).get("effort"), "reasoning.effort"))
    except FieldError as e:
        raise OpenAIError(400, str(e), param=e.field) from None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- tools --------------------------------------------------------------------------------------------
def chat_tools(tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    """Responses function tools `{"type": "function", "name", "description", "parameters", "strict"}`
    in the Chat Completions form chat templates take; hosted tools are refused (this server runs none)."""
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind != "function":
            raise OpenAIError(400, f"tools[{i}].type {kind!r} is not supported: this server runs function tools "
                                   "only (the client runs them)", param=f"tools[{i}].type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise OpenAIError(400, f"tools[{i}].name must be a non-empty string", param=f"tools[{i}].name")
        fn: dict[str, Any] = {"name": name}
        if tool.get("description"):
            fn["description"] = tool["description"]
        params = tool.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise OpenAIError(400, f"tools[{i}].parameters must be a JSON object schema", param=f"tools[{i}].parameters")
        fn["parameters"] = params or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out or None


_CHAT_TOOL_PATH = re.compile(r"(tools\[\d+\])\.function\.")


def responses_tool_field_error(error: FieldError) -> FieldError:
    """A tool check's error (chat/tools.py and the grammar name Chat Completions paths such as
    `tools[1].function.name`) with the path of the Responses request, whose tools are flat
    (`tools[1].name`): the field the client has to fix."""
    def flat(text: str) -> str:
        return _CHAT_TOOL_PATH.sub(r"\1.", text)
    return type(error)(flat(str(error)), flat(error.field) if error.field else error.field, error.code)


def chat_tool_choice(choice: Any) -> Any:
    """Responses tool_choice -> the Chat Completions form: a named function `{"type": "function",
    "name"}` nests its name under "function"; "auto" / "none" / "required" and allowed_tools
    (which chat/tools.py reads inline) pass through."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise OpenAIError(400, "tool_choice must name the function: {'type': 'function', 'name': ...}",
                              param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice, dict) and choice.get("type") not in ("allowed_tools",):
        raise OpenAIError(400, f"tool_choice of type {choice.get('type')!r} is not supported (function tools only)",
                          param="tool_choice.type")
    return choice


def constraint_kwargs(req: ResponsesRequest) -> dict[str, Any]:
    """The output constraint as SamplingParams keywords: `text.format`, or vLLM's `structured_outputs`
    (at most one of its fields; not both, as vLLM refuses both)."""
    kw = text_format_kwargs(req.text)
    so = req.structured_outputs
    if so is None:
        return kw
    if kw:
        raise OpenAIError(400, "give text.format or structured_outputs, not both", param="structured_outputs")
    given = [(key, name, value) for key, name, value in structured_outputs_fields(so)
             if value is not None and value is not False]
    if len(given) > 1:
        raise OpenAIError(400, f"give at most one output constraint; got {', '.join(name for _, name, _ in given)}",
                          param="structured_outputs")
    return {key: parsed_schema(value, name) if key == "json_schema" else
            checked_structural_tag(value, name) if key == "structural_tag" else value for key, name, value in given}


def text_format_kwargs(text: Optional[dict[str, Any]]) -> dict[str, Any]:
    """`text.format` as SamplingParams keywords: json_schema {"name", "schema", "strict"} or json_object."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict):
        raise OpenAIError(400, "text.format must be an object", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise OpenAIError(400, "text.format.schema must be a JSON schema object when type is 'json_schema'",
                              param="text.format.schema")
        # OpenAI guarantees a schema only under strict: what no backend enforces is refused only then
        return {"json_schema": schema if fmt.get("strict") is True else best_effort(schema, "text.format")}
    raise OpenAIError(400, f"text.format.type must be 'text', 'json_object' or 'json_schema'; got {kind!r}",
                      param="text.format.type")


# --- input items -> chat messages ----------------------------------------------------------------------
def _text_of(content: Any, at: str, key: str = "content", assistant: bool = False) -> str:
    """A message's content (or a function_call_output's output, `key`) as text: a string, or content parts
    as chat messages read them (an assistant's refusal part is its text), plain strings among them refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(400, f"{at}.{key} must be a string or a list of content parts", param=f"{at}.{key}")
    return text_of_parts(content, at, assistant=assistant, key=key, bare_strings=False)


def normalize_input(value: Union[str, list[dict[str, Any]]], field_name: str = "input") -> list[Item]:
    """The request's input (or a conversation's new items: `field_name`) as a list of items, each with an id
    (input_items lists them)."""
    raw: list[Any] = [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise OpenAIError(400, f"{field_name}[{i}] must be an object", param=f"{field_name}[{i}]")
    items: list[Item] = [dict(item) for item in raw]
    for item in items:
        if "role" in item:
            item.setdefault("type", "message")
        item.setdefault("id", new_id("msg" if item.get("type") == "message" else "item"))
    return items


def _function_call(item: Item, at: str) -> dict[str, Any]:
    name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
    if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
        raise OpenAIError(400, f"{at}: a function_call item needs call_id and name", param=f"{at}.call_id")
    if not isinstance(args, str):
        args = json.dumps(args)
    # Checked here, where the item's path is known (the session would name its own message index).
    parse_json_object(args or "{}", f"{at}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args or "{}"}}


def input_messages(items: list[Item], known_calls: Optional[dict[str, str]] = None,
                   field_name: str = "input") -> list[Message]:
    """Input items as chat messages. `known_calls` (call_id -> name, from earlier responses) names
    the function of a function_call_output whose call is not among these items; `field_name` is the
    request field the items came in (errors name `field_name[i]`)."""
    names = dict(known_calls or {})
    out: list[Message] = []
    thought: Optional[str] = None  # a reasoning item's text, for the assistant message that follows it
    for i, item in enumerate(items):
        at, kind = f"{field_name}[{i}]", item.get("type")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise OpenAIError(400, f"{at}.role must be one of user, system, developer, assistant; got {role!r}",
                                  param=f"{at}.role")
            said: Message = {"role": "system" if role == "developer" else role,
                             "content": _text_of(item.get("content"), at, assistant=role == "assistant")}
            if role == "assistant" and thought:
                said["reasoning_content"] = thought
            thought = None
            out.append(said)
        elif kind == "reasoning":
            thought = _reasoning_text(item, at)
        elif kind == "function_call":
            call = _function_call(item, at)
            names[call["id"]] = call["function"]["name"]
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and not thought:
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if thought:
                    out[-1]["reasoning_content"] = thought
            thought = None
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise OpenAIError(400, f"{at}: a function_call_output item needs the call_id of its call",
                                  param=f"{at}.call_id")
            text = output if isinstance(output, str) else _text_of(output, at, "output") if isinstance(output, list) \
                else json.dumps(output)
            thought = None
            message: Message = {"role": "tool", "tool_call_id": call_id, "content": text or " "}
            if call_id in names:
                message["name"] = names[call_id]
            out.append(message)
        else:
            raise OpenAIError(400, f"{at}.type {kind!r} is not supported (message, reasoning, function_call, "
                                   "function_call_output and item_reference items)", param=f"{at}.type")
    return out


def _reasoning_text(item: Item, at: str) -> str:
    """A reasoning item's text: its reasoning_text content parts, else its summary's texts (an item with
    only encrypted_content, from another server, carries nothing this one can read: empty)."""
    for key, part_type in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") == part_type
                                                  and isinstance(p.get("text"), str) for p in parts):
            raise OpenAIError(400, f"{at}.{key} must be a list of {{'type': '{part_type}', 'text': ...}} parts",
                              param=f"{at}.{key}")
        if parts:
            return "\n".join(p["text"] for p in parts)
    return ""


# --- a reply -> output items ---------------------------------------------------------------------------
def message_item(item_id: str, text: str, status: str = "completed",
                 logprobs: Optional[list[dict[str, Any]]] = None) -> Item:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs or [])}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> Item:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> Item:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def output_items(message: Message, status: str, parts: Optional[ReplyParts] = None,
                 text_logprobs: Optional[list[dict[str, Any]]] = None) -> list[Item]:
    """A turn's reply (content, tool_calls) as output items: its reasoning (`parts`, with a reasoning
    parser), the text (with `text_logprobs`, when asked), then each call. In an incomplete response
    (max_output_tokens) the last item is the one cut off."""
    items: list[Item] = []
    if parts is not None and parts.reasoning:
        items.append(reasoning_item(new_id("rs"), parts.reasoning))
    content = parts.content if parts is not None else message.get("content")
    if content:
        items.append(message_item(new_id("msg"), content, logprobs=text_logprobs))
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
        items.append(function_call_item(new_id("fc"), call["id"], fn["name"], args))
    mark_cut_off(items, status)
    return items


def mark_cut_off(items: list[Item], status: str) -> None:
    if items and status == "incomplete":
        items[-1]["status"] = "incomplete"


def input_items_page(items: list[Item], limit: int, order: str, after: Optional[str],
                     owner: str = "input item of this response") -> dict[str, Any]:
    """GET /v1/responses/{id}/input_items: a page of a response's input items (OpenAI's list shape); also
    a conversation's items (`owner` names whose items they are in the error for an unknown `after`)."""
    if order not in ("asc", "desc"):
        raise OpenAIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
    if not 1 <= limit <= 100:
        raise OpenAIError(400, f"limit must be in [1, 100], got {limit}", param="limit")
    items = list(reversed(items)) if order == "desc" else list(items)
    if after is not None:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise OpenAIError(400, f"after names no {owner}: {after!r}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
