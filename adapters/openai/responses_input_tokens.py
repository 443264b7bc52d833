"""POST /v1/responses/input_tokens (OpenAI's `client.responses.input_tokens.count(...)`): how many input tokens a
`POST /v1/responses` with the same fields would prefill, without running it. Agent frameworks call it to decide
when to compact or trim a long conversation before the next turn.

The count is the prompt a response would start from: the instructions, the conversation so far (the items of
`conversation`, or the chain behind `previous_response_id`) and the new input, with the tools and template
variables, rendered through the chat template as a session turn renders it. With `truncation: "auto"` it is the
prompt after the oldest turns that do not fit are dropped. Nothing is created, continued or held: the request is
checked as a response would be (the same 400s and 404s), then only rendered, in a render-pool worker.
"""

from __future__ import annotations

from typing import Any

from agentserve.adapters.openai import responses_items as I
from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.adapters.openai.responses import ResponsesEndpoint
from agentserve.adapters.openai.responses_truncation import rendered_length
from agentserve.chat.tools import normalize_tools
from agentserve.service.tenants import tenant_of_scope


async def count_input_tokens(responses: ResponsesEndpoint, req: I.ResponsesRequest, raw_request: Any) -> dict[str, Any]:
    tenant = tenant_of_scope(raw_request.scope).name
    responses.s.resolve_model(req.model)  # 404 for a model or adapter that is not served
    tools, _ = responses.check(req)
    kwargs = I.template_kwargs(req)
    items = responses.store.resolve_references(I.normalize_input(req.input), tenant)
    prev, conv, new_messages = responses.continued(req, tenant, items)
    history = prev.conversation() if prev is not None else []
    if conv is not None:  # later items may change how earlier ones render: the conversation's and the input's at once
        new_messages = I.input_messages(conv.items + items)
    if not history and not new_messages:
        raise OpenAIError(400, "input must contain at least one item", param="input")
    try:
        fitted = await responses.fitted(req, history, new_messages, tools, kwargs) if req.truncation == "auto" else None
        prompt = fitted if fitted is not None else responses.system(req) + history + new_messages
        pool, vocab_size, tools_n = responses.s.render_pool, responses.s.engine.arch.vocab_size, normalize_tools(tools)
        count = await pool.run(lambda tok: rendered_length(pool, tok, prompt, tools_n, vocab_size, kwargs))
    except Exception as e:  # noqa: BLE001 - a template's or the length check's refusal -> its HTTP status
        raise responses.http_error(e) from None
    return {"object": "response.input_tokens", "input_tokens": count}
