"""The HTTP routes of the Responses API (responses.py) and the Conversations API (conversations.py), and how
an endpoint's answer becomes an HTTP response (JSON, or server-sent events for a stream)."""

from __future__ import annotations

from typing import Any, Awaitable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from agentserve.adapters.openai.conversations import (ConversationCreateRequest, ConversationItemsRequest,
                                                      ConversationsEndpoint, ConversationUpdateRequest)
from agentserve.adapters.openai.responses import ResponsesEndpoint
from agentserve.adapters.openai.responses_input_tokens import count_input_tokens
from agentserve.adapters.openai.responses_items import ResponsesRequest
from agentserve.adapters.openai.serving import ClientDisconnected


async def respond(result: Awaitable[Any]) -> Response:
    """A whole response as JSON, a stream as server-sent events; 499 when the client went away."""
    try:
        body = await result
    except ClientDisconnected:
        return Response(status_code=499)
    return as_response(body)


def as_response(body: Any) -> Response:
    if isinstance(body, dict):
        return JSONResponse(body)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def add_responses_routes(app: FastAPI, responses: ResponsesEndpoint) -> None:
    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, raw_request: Request) -> Response:
        return await respond(responses.create(body, raw_request))

    @app.post("/v1/responses/input_tokens")
    async def count_response_input_tokens(body: ResponsesRequest, raw_request: Request) -> JSONResponse:
        return JSONResponse(await count_input_tokens(responses, body, raw_request))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str, raw_request: Request, stream: bool = False,
                                starting_after: Optional[int] = None) -> Response:
        return as_response(responses.retrieve(response_id, raw_request, stream, starting_after))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str, raw_request: Request) -> JSONResponse:
        return JSONResponse(await responses.cancel(response_id, raw_request))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, raw_request: Request) -> JSONResponse:
        return JSONResponse(await responses.delete(response_id, raw_request))

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, raw_request: Request, limit: int = 20, order: str = "desc",
                                   after: Optional[str] = None) -> JSONResponse:
        return JSONResponse(responses.input_items(response_id, raw_request, limit, order, after))

    _add_conversation_routes(app, ConversationsEndpoint(responses))


def _add_conversation_routes(app: FastAPI, conversations: ConversationsEndpoint) -> None:
    @app.post("/v1/conversations")
    async def create_conversation(body: ConversationCreateRequest, raw_request: Request) -> JSONResponse:
        return JSONResponse(conversations.create(body, raw_request))

    @app.get("/v1/conversations/{conversation_id}")
    async def retrieve_conversation(conversation_id: str, raw_request: Request) -> JSONResponse:
        return JSONResponse(conversations.retrieve(conversation_id, raw_request))

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, body: ConversationUpdateRequest,
                                  raw_request: Request) -> JSONResponse:
        return JSONResponse(conversations.update(conversation_id, body, raw_request))

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, raw_request: Request) -> JSONResponse:
        return JSONResponse(await conversations.delete(conversation_id, raw_request))

    @app.get("/v1/conversations/{conversation_id}/items")
    async def list_conversation_items(conversation_id: str, raw_request: Request, limit: int = 20, order: str = "desc",
                                      after: Optional[str] = None) -> JSONResponse:
        return JSONResponse(conversations.list_items(conversation_id, raw_request, limit, order, after))

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_conversation_items(conversation_id: str, body: ConversationItemsRequest,
                                     raw_request: Request) -> JSONResponse:
        return JSONResponse(conversations.add_items(conversation_id, body, raw_request))

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def retrieve_conversation_item(conversation_id: str, item_id: str, raw_request: Request) -> JSONResponse:
        return JSONResponse(conversations.get_item(conversation_id, item_id, raw_request))

    @app.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_conversation_item(conversation_id: str, item_id: str, raw_request: Request) -> JSONResponse:
        return JSONResponse(await conversations.delete_item(conversation_id, item_id, raw_request))
