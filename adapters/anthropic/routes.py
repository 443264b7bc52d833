"""The Messages API's HTTP routes (messages.py). Their errors are written in Anthropic's shape by the app's
error handlers (adapters/openai/app.py asks protocol.is_messages_path)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from agentserve.adapters.anthropic.messages import MessagesEndpoint
from agentserve.adapters.anthropic.protocol import MESSAGES_PATH, CountTokensRequest, MessagesRequest
from agentserve.adapters.openai.chat import ChatEndpoint
from agentserve.adapters.openai.responses_routes import respond


def add_anthropic_routes(app: FastAPI, chat: ChatEndpoint) -> None:
    messages = MessagesEndpoint(chat)

    @app.post(MESSAGES_PATH)
    async def create_message(body: MessagesRequest, raw_request: Request) -> Response:
        return await respond(messages.create(body, raw_request))

    @app.post(MESSAGES_PATH + "/count_tokens")
    async def count_message_tokens(body: CountTokensRequest) -> JSONResponse:
        return JSONResponse(await messages.count_tokens(body))
