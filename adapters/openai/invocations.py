"""SageMaker's inference route, as vLLM serves it: `POST /invocations` with a chat completions body (it has
`messages`) is that chat completion, with a completions body (`prompt`) that completion, streamed or whole as
the body asks; `/ping` (app.py) is the health check SageMaker polls.

Unlike vLLM, which leaves the route outside its API-key check (SageMaker fronts it with its own auth), a
server started with API keys asks for one here as on /v1, and the request takes one of its tenant's request
slots: a deployment outside SageMaker must not have an open door beside its keys.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from agentserve.adapters.openai.chat import ChatEndpoint
from agentserve.adapters.openai.completions import CompletionsEndpoint
from agentserve.adapters.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from agentserve.adapters.openai.responses_routes import respond

INVOCATIONS_PATH = "/invocations"


async def _json_object(raw_request: Request) -> dict[str, Any]:
    """The body as a JSON object; its faults in the words the /v1 routes use (app.py's validation handler)."""
    raw = await raw_request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        body = json.loads(raw)
    except ValueError as e:  # not JSON, or not UTF-8
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": str(e)}}]) from None
    if not isinstance(body, dict):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",),
                                       "msg": "Input should be a valid dictionary", "input": body}])
    return body


RequestModel = TypeVar("RequestModel", bound=BaseModel)


def _validated(model: type[RequestModel], body: dict[str, Any]) -> RequestModel:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def add_invocations_route(app: FastAPI, chat: ChatEndpoint, completions: CompletionsEndpoint) -> None:
    @app.post(INVOCATIONS_PATH)
    async def invocations(raw_request: Request) -> Response:
        body = await _json_object(raw_request)
        if "messages" in body:
            return await respond(chat.create(_validated(ChatCompletionRequest, body), raw_request))
        if "prompt" in body:
            return await respond(completions.create(_validated(CompletionRequest, body), raw_request))
        raise OpenAIError(400, "/invocations takes a chat completions body (with messages) or a completions body "
                               "(with prompt); this one has neither", param="messages")
