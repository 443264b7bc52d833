"""What Anthropic clients send (the Messages API's request bodies) and the error shape they read:
{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MESSAGES_PATH = "/v1/messages"

# Anthropic's error types by HTTP status (its SDK picks the exception class from the status).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
                422: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
                503: "overloaded_error", 529: "overloaded_error"}


def is_messages_path(path: str) -> bool:
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


class CountTokensRequest(BaseModel):
    """POST /v1/messages/count_tokens: what a message request renders from, without generation settings.
    Unknown fields are accepted and ignored (cache_control, metadata, ...), as for chat completions."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    messages: list[Any]
    system: Union[None, str, list[Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[dict[str, Any]] = None
    thinking: Optional[dict[str, Any]] = None
    output_config: Optional[dict[str, Any]] = None  # {"effort": ..., "format": {"type": "json_schema", "schema": ...}}


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    # Sampling knobs the current SDK no longer sends (older clients, litellm and raw HTTP do).
    temperature: Optional[float] = Field(default=None, ge=0.0, le=1.0)  # Anthropic's range (OpenAI's goes to 2)
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    metadata: Optional[dict[str, Any]] = None
