"""POST /v1/chat/completions: messages through the chat template (in the render pool) -> one engine
request -> OpenAI chat.completion responses and SSE chunks, tool calls parsed into `tool_calls`."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from agentserve.adapters.openai.chat_echo import echo_prefix, reply_role
from agentserve.adapters.openai.chat_stream_state import ChatStreamState
from agentserve.adapters.openai.chat_template_vars import apply_template_overrides, chat_template_variables
from agentserve.adapters.openai.legacy_functions import legacy_delta, legacy_message, legacy_messages, legacy_tools
from agentserve.adapters.openai.logprobs import vllm_prompt_logprobs
from agentserve.adapters.openai.protocol import ChatCompletionRequest, OpenAIError
from agentserve.adapters.openai.request_ids import response_id
from agentserve.adapters.openai.serving import ClientDisconnected, OpenAIServing, now, sse
from agentserve.adapters.openai.usage import stream_usage, usage
from agentserve.adapters.openai.tool_chunks import ToolCallChunks
from agentserve.chat import limits as L
from agentserve.chat.messages import OPENAI_RULES, normalize_messages
from agentserve.chat.reasoning import split_reasoning
from agentserve.chat.reply import opener_is_special, tool_format_of
from agentserve.chat.tool_schemas import check_tool_schemas
from agentserve.chat.tools import check_tool_choice
from agentserve.engine.validation import logprobs_limit
from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sampling_params import SamplingParams

Tools = Optional[list[dict[str, Any]]]


def _check_limits(req: ChatCompletionRequest, limits: Any) -> None:
    L.check_count(len(req.messages), limits.max_messages, "messages", "max-messages")
    L.check_count(len(req.tools or ()), limits.max_tools, "tools", "max-tools")
    L.check_count(len(req.functions or ()), limits.max_tools, "functions", "max-tools")
    for i, t in enumerate(req.tools or ()):
        if t.function.parameters is not None:
            L.check_schema(t.function.parameters, f"tools[{i}].function.parameters", limits)
    for i, f in enumerate(req.functions or ()):
        if f.parameters is not None:
            L.check_schema(f.parameters, f"functions[{i}].parameters", limits)


def _check_tools(req: ChatCompletionRequest) -> tuple[Tools, Any]:
    tools: Tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if req.functions is not None or req.function_call is not None:
        fn_tools, fn_choice = legacy_tools(req)
        tools, choice = tools or fn_tools, choice if req.function_call is None else fn_choice
    choice = check_tool_choice(tools, choice)
    if tools and choice != "none":
        check_tool_schemas(tools)
    return tools, choice


def _top_logprobs(req: ChatCompletionRequest, limit: int) -> int:
    """`limit`: the engine's (--max-logprobs, engine/validation.py), named here as top_logprobs."""
    if req.top_logprobs is None:
        return 0
    if not req.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if not 0 <= req.top_logprobs <= limit:
        raise OpenAIError(400, f"top_logprobs must be in [0, {limit}], got {req.top_logprobs}", param="top_logprobs")
    return req.top_logprobs


def _check_prompt_logprobs(req: ChatCompletionRequest) -> None:
    if req.prompt_logprobs is not None and req.stream:
        raise OpenAIError(400, "prompt_logprobs is not available when stream is true (as in vLLM)",
                          param="prompt_logprobs")


class ChatEndpoint:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving
        self._tool_fmt: Optional[str] = None  # detected lazily ("" when unknown)

    def tool_format(self) -> Optional[str]:
        if self._tool_fmt is None:
            self._tool_fmt = tool_format_of(self.s.tokenizer) or ""
        return self._tool_fmt or None

    def _render(self, tok: Any, messages: list[dict[str, Any]], tools: Tools, req: ChatCompletionRequest,
                kwargs: dict[str, Any]) -> list[int]:
        """A render pool worker: the messages through the chat template, then tokenized."""
        pool = self.s.render_pool
        variables = dict(kwargs)
        template = variables.pop("chat_template", None)  # the request's own template (chat_template_variables)
        shown_tools = variables.pop("tools", tools)  # chat_template_kwargs.tools: what the template shows (vLLM's)
        text = pool.render(tok, messages, shown_tools, add_generation_prompt=req.add_generation_prompt,
                           chat_template=template, template_kwargs=variables)
        return pool.encode(tok, text, "messages", add_special_tokens=req.add_special_tokens)

    def _tool_params(self, req: ChatCompletionRequest, tools: Tools, tool_choice: Any) -> dict[str, Any]:
        """SamplingParams fields for a reply that may call tools."""
        extra: dict[str, Any] = {"tools": tools, "tool_choice": tool_choice,
                                 "parallel_tool_calls": req.parallel_tool_calls and req.functions is None}
        fmt = self.tool_format()
        if fmt is not None and opener_is_special(self.s.tokenizer, fmt):
            # The call opener is a special token ([TOOL_CALLS], <|python_tag|>): keep it in the text.
            extra["skip_special_tokens"] = False
        return extra

    def _sampling_params(self, req: ChatCompletionRequest, top_n: int, extra: dict[str, Any]) -> SamplingParams:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        markers = self.s.engine.reasoning
        if markers is not None and markers.special:  # [THINK] must reach the reasoning split
            extra = {**extra, "skip_special_tokens": False}
        try:
            return self.s.sampling_params(req, max_tokens=max_tokens, logprobs=top_n if req.logprobs else None,
                                          extra=extra)
        except OpenAIError as e:
            if e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
            raise

    def _check_template(self, req: ChatCompletionRequest) -> None:
        tok = self.s.need_tokenizer()
        if not tok.chat_template:
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="messages")
        if req.continue_final_message and req.add_generation_prompt:
            raise OpenAIError(400, "continue_final_message needs add_generation_prompt=false",
                              param="continue_final_message")

    def prepare_prompt(self, req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], Tools, Any, dict[str, Any]]:
        """The checks before rendering (template, messages, tools): (messages, tools, tool_choice, template
        kwargs), for render_prompt. Shared with POST /tokenize."""
        apply_template_overrides(req)
        self._check_template(req)
        template_kwargs = chat_template_variables(req, self.s.limits.trust_request_chat_template)
        if not req.messages:
            raise OpenAIError(400, "messages must be a non-empty list", param="messages")
        messages = normalize_messages(legacy_messages(req.messages), OPENAI_RULES)
        self.s.render_pool.check_messages(messages)
        tools, tool_choice = _check_tools(req)
        drop_tools = tool_choice == "none" and self.s.limits.exclude_tools_when_tool_choice_none  # vLLM's flag
        return messages, None if drop_tools else tools, tool_choice, template_kwargs

    async def render_prompt(self, req: ChatCompletionRequest, messages: list[dict[str, Any]], tools: Tools,
                            template_kwargs: dict[str, Any]) -> list[int]:
        """The prompt's token ids: the chat template in a render pool worker, then the tokenizer."""
        return await self.s.render_pool.run(lambda tok: self._render(tok, messages, tools, req, template_kwargs))

    async def create(self, req: ChatCompletionRequest, raw_request: Any, fit_to_context: bool = False) -> Any:
        """`fit_to_context`: a max_tokens past the context's room is lowered to it (OpenAIServing.validate)."""
        self.s.check_edge(req)
        _check_limits(req, self.s.limits)
        lora_name = self.s.resolve_model(req.model)
        messages, tools, tool_choice, template_kwargs = self.prepare_prompt(req)
        top_n = _top_logprobs(req, logprobs_limit(self.s.config.model.max_logprobs, self.s.engine.arch.vocab_size))
        _check_prompt_logprobs(req)
        parse_tools = bool(tools) and tool_choice != "none"
        params = self._sampling_params(req, top_n, self._tool_params(req, tools, tool_choice) if parse_tools else {})
        prompt_ids = self.s.truncate(await self.render_prompt(req, messages, tools, template_kwargs), params)
        params = self.s.validate(prompt_ids, params, "messages", fit_to_context,
                                 "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        self.s.check_queue(1, params.n, raw_request)
        role = reply_role(messages, req.add_generation_prompt, self.s.limits.response_role)
        ctx = _ChatContext(self, req, response_id("chatcmpl", raw_request, req.request_id), prompt_ids, params, lora_name,
                           tools if parse_tools else None, tool_choice, top_n, echo_prefix(messages, req.echo, role), role)
        if req.stream:
            return ctx.stream(await self.s.primed(ctx.outputs(raw_request)))
        return await ctx.full(raw_request)


class _ChatContext:
    def __init__(self, endpoint: ChatEndpoint, req: ChatCompletionRequest, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, lora_name: Optional[str], tools: Tools, tool_choice: Any,
                 top_n: int, echo: str, role: str) -> None:
        serving = endpoint.s
        self.echo, self.role = echo, role  # what each choice's content starts with (vLLM's echo); its role
        self.endpoint, self.s, self.req, self.id = endpoint, serving, req, request_id
        self.prompt_ids, self.params = prompt_ids, params
        self.engine_kwargs = serving.engine_kwargs(req, lora_name)
        self.tools, self.tool_choice = tools, tool_choice
        self.legacy = req.functions is not None  # calls answered as function_call (legacy_functions.py)
        # With special tokens kept in the text (for a special tool-call opener or reasoning marker), the EOS
        # token that ended the reply would be in it too: strip it, as it is when special tokens are skipped.
        tok = serving.tokenizer
        self.eos_texts: tuple[str, ...] = ()
        self.eos_ids = frozenset(serving.engine.eos_token_ids)  # the generation config's others stop by id
        if (tools or serving.engine.reasoning is not None) and not params.skip_special_tokens and tok is not None:
            ids = sorted(serving.engine.eos_token_ids)
            self.eos_texts = tuple(t for t in (tok.convert_ids_to_tokens(ids) or []) if t)
        self.top_n = top_n
        self.logprobs = serving.logprob_formatter(req.return_tokens_as_token_ids)
        markers = serving.engine.reasoning
        self.reasoning_parser: Optional[str] = markers.parser if markers is not None else None
        # Whether the reply starts inside a reasoning block (the grammar's rule: grammar/reasoning.py).
        self.in_reasoning = markers is not None and not markers.ended_in(prompt_ids)
        self.created = now()
        self.model = req.model or serving.model_name

    def outputs(self, raw_request: Any) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        return self.s.outputs(self.id, [self.prompt_ids], self.params, raw_request, self.engine_kwargs, self.req)

    def tool_chunks(self) -> Optional[ToolCallChunks]:
        if not self.tools:
            return None
        return ToolCallChunks(self.endpoint.tool_format(), self.tools, parallel=self.params.parallel_tool_calls,
                              typed_answer=self.params.typed_answer)

    def _strip_eos(self, text: str, c: CompletionOutput) -> str:
        if self.eos_texts and c.finish_reason == "stop" and (c.stop_reason is None or c.stop_reason in self.eos_ids):
            for eos in self.eos_texts:
                if text.endswith(eos):
                    return text[:-len(eos)]
        return text

    def _held_back(self, text: str) -> int:
        """How much of the text's tail may be the start of an EOS text."""
        hold = 0
        for eos in self.eos_texts:
            for n in range(min(len(eos), len(text)), 0, -1):
                if text.endswith(eos[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _safe_text(self, c: CompletionOutput, st: ChatStreamState, delta: str) -> str:
        """The next piece of choice k's text (`delta`: its new content) for the parser: with special tokens
        kept, a tail that may be the start of the EOS text waits until the next delta shows what it is."""
        k = c.index
        st.acc[k] += delta
        text = st.acc[k]
        upto = len(self._strip_eos(text, c)) if c.finish_reason is not None else len(text) - self._held_back(text)
        piece = text[st.fed[k]:upto] if upto > st.fed[k] else ""
        st.fed[k] = max(st.fed[k], upto)
        return piece

    def _finish_reason(self, c: CompletionOutput, has_calls: bool, cut_off: bool = False) -> Optional[str]:
        """"tool_calls" promises complete calls: a stop string inside a call's arguments ends the reply
        with that call cut off (returned as far as it got, as max_tokens does), which stays "stop"."""
        reason = c.finish_reason
        if has_calls and not cut_off and reason == "stop" and not isinstance(self.tool_choice, dict):
            # OpenAI answers "stop" for a named tool_choice, "tool_calls" otherwise ("function_call", legacy)
            return "function_call" if self.legacy else "tool_calls"
        return reason

    async def full(self, raw_request: Any) -> dict[str, Any]:
        final: Optional[RequestOutput] = None
        async with contextlib.aclosing(self.outputs(raw_request)) as it:
            async for _, out in it:
                final = out
        assert final is not None
        choices = []
        completion_tokens = 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            reasoning, text = (split_reasoning(self.reasoning_parser, c.text, self.in_reasoning) if self.reasoning_parser
                               else (None, c.text))
            message: dict[str, Any] = {"role": self.role, "content": text}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            calls: list[dict[str, Any]] = []
            ts = self.tool_chunks()
            if ts is not None:
                content, calls = ts.parse_whole(self._strip_eos(text, c))
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    if self.legacy:
                        legacy_message(message)
            if self.echo:
                message["content"] = self.echo + (message["content"] or "")
            logprobs = None
            if self.req.logprobs and c.logprobs is not None:
                logprobs = {"content": self.logprobs.chat(c.token_ids, c.logprobs, self.top_n)}
            reason = self._finish_reason(c, bool(calls), ts is not None and ts.cut_off)
            choices.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                            "stop_reason": c.stop_reason, **({"token_ids": list(c.token_ids)} if self.req.return_token_ids
                                                              else {})})
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(len(self.prompt_ids), completion_tokens, final.num_cached_tokens)}
        if self.req.prompt_logprobs is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(final.prompt_logprobs)
        if self.req.return_token_ids:  # vLLM's: the prompt's tokens beside the choices' (token_ids)
            body["prompt_token_ids"] = self.prompt_ids
        return body

    def _chunk(self, st: ChatStreamState, index: int, delta: dict[str, Any], logprobs: Any = None,
               finish: Optional[str] = None, stop_reason: Any = None) -> str:
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": [choice]}
        if self.req.return_token_ids:  # vLLM's: the prompt's ids in the first chunk, the new tokens' in each
            # (the opening role chunk carries none: a choice's tokens go with its content, or its finish chunk)
            if "role" in delta:
                choice["token_ids"] = []
            else:
                choice["token_ids"], st.pending_ids[index] = st.pending_ids[index], []
            if not st.prompt_ids_sent:
                body["prompt_token_ids"], st.prompt_ids_sent = self.prompt_ids, True
        if st.include_usage:
            body["usage"] = usage(len(self.prompt_ids), sum(st.completion_tokens), st.cached) if st.continuous \
                else None
        return sse(body)

    def _new_logprobs(self, st: ChatStreamState, c: CompletionOutput) -> Optional[dict[str, Any]]:
        k = c.index
        logprobs = None
        new_ids = c.token_ids[st.sent_lp[k]:]
        if self.req.logprobs and c.logprobs is not None and new_ids:
            logprobs = {"content": self.logprobs.chat(new_ids, c.logprobs[st.sent_lp[k]:len(c.token_ids)],
                                                        self.top_n)}
        st.sent_lp[k] = len(c.token_ids)
        st.completion_tokens[k] = len(c.token_ids)
        return logprobs

    def _choice_chunks(self, st: ChatStreamState, c: CompletionOutput) -> list[str]:
        """The chunks one output of choice c.index adds to the stream."""
        k = c.index
        chunks = []
        st.take_new_ids(k, c.token_ids)
        if not st.started[k]:
            st.started[k] = True
            chunks.append(self._chunk(st, k, {"role": self.role, "content": ""}))
            if self.echo:
                chunks.append(self._chunk(st, k, {"content": self.echo}))
        logprobs = self._new_logprobs(st, c)
        delta = c.delta_text
        rs = st.reasoning[k]
        if rs is not None:
            thought, delta = rs.feed(delta)
            if c.finish_reason is not None:  # text the split held back: both parts, in order
                held_thought, held_content = rs.finish()
                thought, delta = thought + held_thought, delta + held_content
            if thought:
                chunks.append(self._chunk(st, k, {"reasoning_content": thought}, logprobs))
                logprobs = None
        ts = st.streams[k]
        if ts is None:
            if delta or logprobs:
                chunks.append(self._chunk(st, k, {"content": delta}, logprobs))
        else:
            deltas = ts.feed(self._safe_text(c, st, delta))
            if c.finish_reason is not None:
                deltas += ts.finish()
            for j, d in enumerate(deltas):
                st.has_calls[k] = st.has_calls[k] or "tool_calls" in d
                chunks.append(self._chunk(st, k, legacy_delta(d) if self.legacy else d, logprobs if j == 0 else None))
            if not deltas and logprobs:
                chunks.append(self._chunk(st, k, {"content": ""}, logprobs))
        if c.finish_reason is not None:
            st.done[k] = True
            reason = self._finish_reason(c, st.has_calls[k], ts is not None and ts.cut_off)
            chunks.append(self._chunk(st, k, {}, None, reason, c.stop_reason))
        return chunks

    async def stream(self, outputs: AsyncGenerator[tuple[int, RequestOutput], None]) -> AsyncIterator[str]:
        include_usage, continuous = stream_usage(self.req.stream_options, self.s.limits.enable_force_include_usage)
        st = ChatStreamState(self.params.n, [self.tool_chunks() for _ in range(self.params.n)], self.reasoning_parser,
                             self.in_reasoning, include_usage, continuous)
        try:
            async with contextlib.aclosing(outputs) as it:
                async for _, out in it:
                    st.cached = out.num_cached_tokens
                    for c in out.outputs:
                        if not st.done[c.index]:
                            for chunk in self._choice_chunks(st, c):
                                yield chunk
            if include_usage:
                yield sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [],
                           "usage": usage(len(self.prompt_ids), sum(st.completion_tokens), st.cached)})
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except OpenAIError as e:
            yield sse(e.body())
            yield "data: [DONE]\n\n"
