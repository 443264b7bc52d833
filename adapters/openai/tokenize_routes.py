"""vLLM's tokenizer endpoints, for clients that count or build prompts with the server's own tokenizer
and chat template:

- POST /tokenize {"prompt": text, "add_special_tokens": true} or {"messages": [...], "tools": [...],
  "add_generation_prompt": true, "continue_final_message", "add_special_tokens", "chat_template",
  "chat_template_kwargs"} ->
  {"count", "max_model_len", "tokens", "token_strs"} (token_strs with "return_token_strs": true). The
  messages form renders exactly as POST /v1/chat/completions does (same checks, template and tools), so
  its count is the prompt's.
- POST /detokenize {"tokens": [ids]} -> {"prompt": text}.
`model` is optional and, when given, must name the served model or a loaded adapter (404 otherwise).
Bad input is a 400 naming the field, as on the other endpoints.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentserve.adapters.openai.chat import ChatEndpoint
from agentserve.adapters.openai.protocol import ChatCompletionRequest, OpenAIError, ToolDefinition
from agentserve.adapters.openai.serving import OpenAIServing
from agentserve.chat import limits as L


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM ignores fields it does not know, as the chat endpoint does
    model: Optional[str] = None
    prompt: Optional[str] = None
    add_special_tokens: Optional[bool] = None  # default: true for a prompt, false for messages (vLLM's)
    messages: Optional[list[dict[str, Any]]] = None
    tools: Optional[list[ToolDefinition]] = None  # validated as /v1/chat/completions validates them
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None  # as on chat completions: refused unless --trust-request-chat-template
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    tokens: list[int] = Field(max_length=1 << 20)


async def _chat_ids(chat: ChatEndpoint, body: TokenizeRequest) -> list[int]:
    fields = {"messages": body.messages, "tools": body.tools, "add_generation_prompt": body.add_generation_prompt,
              "continue_final_message": body.continue_final_message, "chat_template_kwargs": body.chat_template_kwargs,
              "add_special_tokens": body.add_special_tokens, "chat_template": body.chat_template}
    try:
        req = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:  # what the chat endpoint's own parsing refuses: its 400, from the app's handler
        raise RequestValidationError(e.errors()) from None
    messages, tools, _, template_kwargs = chat.prepare_prompt(req)
    return await chat.render_prompt(req, messages, tools, template_kwargs)


def add_tokenize_routes(app: FastAPI, serving: OpenAIServing, chat: ChatEndpoint) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        L.check_utf8(body.model_dump(exclude_none=True), "")  # the tokenizer cannot take a lone surrogate
        serving.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give exactly one of prompt and messages", param="prompt")
        tok = serving.need_tokenizer()
        if body.messages is not None:
            ids = await _chat_ids(chat, body)
        else:
            text, special = body.prompt or "", body.add_special_tokens is not False
            pool = serving.render_pool
            ids = await pool.run(lambda t: pool.encode(t, text, "prompt", add_special_tokens=special))
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": serving.engine.max_model_len, "tokens": ids,
                             "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        serving.resolve_model(body.model)
        serving.need_tokenizer()
        vocab = serving.engine.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"tokens must be token ids in [0, {vocab}); got {bad[:5]}", param="tokens")
        ids = list(body.tokens)
        return JSONResponse({"prompt": await serving.render_pool.run(lambda t: t.decode(ids))})
