"""OpenAI request models (what clients send) and the OpenAI error shape.

Requests are parsed with pydantic so that a wrong type is a 400 naming the field. Unknown fields are
accepted and ignored, as OpenAI-compatible servers do (clients send fields this server does not
know, e.g. `store`, `metadata`, `service_tier`). vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...) are understood. Responses are
built as plain dicts in serving.py (cheaper than models, and the exact OpenAI JSON).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: Optional[str] = None, param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_OF_STATUS.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def checked_cache_salt(cache_salt: Optional[str]) -> Optional[str]:
    """A request's cache_salt within vLLM's bounds. An empty salt is refused, not read as no salt: the
    client asked for its own cache namespace, and silently sharing the unsalted one would not give it."""
    if cache_salt is not None and not 1 <= len(cache_salt) <= 1024:
        raise OpenAIError(400, "cache_salt must be a string of 1 to 1024 characters", param="cache_salt")
    return cache_salt


_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    # Unknown fields are ignored (OpenAI clients send many this server has no use for).
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())
    # Fields OpenAI's API declares nullable whose null means the default ("n": null, "stream": null):
    # clients that serialize every optional field send them (vLLM takes them too).
    NULL_MEANS_DEFAULT: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(name, False) is None for name in cls.NULL_MEANS_DEFAULT):
            return {k: v for k, v in data.items() if not (v is None and k in cls.NULL_MEANS_DEFAULT)}
        return data


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extra: usage on every chunk


class FunctionDefinition(_Request):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDefinition(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class JSONSchemaFormat(_Request):
    name: str = "response"
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JSONSchemaFormat] = None
    # type "structural_tag" (vLLM's, grammar/structural_tag.py): structures + triggers, or xgrammar's format
    structures: Optional[list[Any]] = None
    triggers: Optional[list[Any]] = None
    format: Optional[Any] = None

    def structural_tag(self) -> dict[str, Any]:
        """The structural tag this response format gives (type "structural_tag")."""
        return {"type": "structural_tag", **self.model_dump(exclude={"type", "json_schema"}, exclude_none=True)}


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` (its successor to the guided_* fields): at most one of these."""
    json_schema: Union[None, str, dict[str, Any]] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Union[None, str, dict[str, Any]] = None


class _SamplingFields(_Request):
    """Fields shared by both endpoints (OpenAI's and vLLM's extras)."""
    NULL_MEANS_DEFAULT: ClassVar[tuple[str, ...]] = ("frequency_penalty", "presence_penalty", "n", "stream")

    model: Optional[str] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    n: int = 1
    seed: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    thinking_token_budget: Optional[int] = None  # needs --reasoning-parser
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided_json: Union[None, str, dict[str, Any]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structural_tag: Union[None, str, dict[str, Any]] = None  # vLLM's (before structured_outputs): JSON text
    structured_outputs: Optional[StructuredOutputs] = None
    cache_salt: Optional[str] = None
    priority: int = 0
    prompt_logprobs: Optional[int] = None
    return_tokens_as_token_ids: Optional[bool] = None  # None: the server's --return-tokens-as-token-ids
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids beside the text
    truncate_prompt_tokens: Optional[int] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    request_id: Optional[str] = None  # the response's id (request_ids.py); an X-Request-Id header wins


class ChatCompletionRequest(_SamplingFields):
    NULL_MEANS_DEFAULT = _SamplingFields.NULL_MEANS_DEFAULT + ("logprobs", "parallel_tool_calls")
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[ToolDefinition]] = None
    tool_choice: Union[None, str, dict[str, Any]] = None
    parallel_tool_calls: bool = True
    # The legacy function-calling fields (before tools): mapped to tools / tool_choice.
    functions: Optional[list[FunctionDefinition]] = None
    function_call: Union[None, str, dict[str, Any]] = None
    # vLLM extras
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the chat template places them; true adds the tokenizer's too (vLLM's)
    continue_final_message: bool = False
    echo: bool = False  # the reply starts with the last message when it has the reply's role (chat_echo.py)
    documents: Optional[list[dict[str, Any]]] = None  # RAG documents, handed to the chat template (vLLM's)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[Any] = None  # OpenAI's; a template variable (chat/template_kwargs.py)
    chat_template: Optional[str] = None  # refused unless --trust-request-chat-template


class CompletionRequest(_SamplingFields):
    NULL_MEANS_DEFAULT = _SamplingFields.NULL_MEANS_DEFAULT + ("echo",)
    # list[int] before list[str]: pydantic's smart union still picks by exactness, but a token-id list is no
    # longer first tried as strings (an error object per element: 0.5 s per million ids on the event loop).
    prompt: Union[str, list[int], list[str], list[list[int]]]
    best_of: Optional[int] = None
    echo: bool = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16
    suffix: Optional[str] = None
    add_special_tokens: bool = True  # the tokenizer's BOS etc. before the prompt text (vLLM's)
