"""POST /v1/completions: prompts (text or token ids, one or many) -> engine requests -> OpenAI
text_completion responses and SSE chunks (echo, logprobs with text offsets, usage)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from agentserve.adapters.openai.logprobs import vllm_prompt_logprobs
from agentserve.adapters.openai.protocol import CompletionRequest, OpenAIError
from agentserve.adapters.openai.request_ids import response_id
from agentserve.adapters.openai.serving import ClientDisconnected, OpenAIServing, clone_params, now, sse
from agentserve.adapters.openai.usage import stream_usage, usage
from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sampling_params import SamplingParams

def _prompts(req: CompletionRequest) -> tuple[list[Optional[str]], list[Any]]:
    """(text per prompt or None for token ids, the prompts) from the request's four prompt shapes."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt], [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt), list(prompt)  # type: ignore[arg-type]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [None], [prompt]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [None] * len(prompt), list(prompt)
    raise OpenAIError(400, "prompt must be a non-empty string, list of strings, list of token ids or "
                           "list of token id lists", param="prompt")


def _check_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise OpenAIError(400, f"best_of must equal n (got best_of={req.best_of}, n={req.n}); best_of > n is "
                               "not supported", param="best_of")
    if req.max_tokens == 0 and not req.echo:
        raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt alone)", param="max_tokens")


def _prompt_logprobs(req: CompletionRequest) -> Optional[int]:
    """vLLM's: echo with logprobs scores the echoed prompt with the same top n (or prompt_logprobs' n if wider)."""
    if req.echo and req.logprobs is not None:
        return max(req.logprobs, req.prompt_logprobs or 0)
    return req.prompt_logprobs


def _text_end(logprobs: dict[str, Any]) -> int:
    """Where the text a run of completions logprobs covers ends (its offsets start at 0)."""
    return sum(len(t) for t in logprobs["tokens"])


def _joined(first: Optional[dict[str, Any]], second: dict[str, Any]) -> dict[str, Any]:
    """Two runs of completions logprobs (the echoed prompt's, then the generated tokens') as one."""
    if first is None:
        return second
    return {key: first[key] + second[key] for key in first}


class CompletionsEndpoint:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    async def _tokenize(self, texts: list[Optional[str]], prompts: list[Any], params: SamplingParams,
                        add_special_tokens: bool) -> tuple[list[list[int]], list[int]]:
        """Token ids per prompt (truncated as truncate_prompt_tokens asks), and the max_tokens each leaves."""
        pool = self.s.render_pool
        prompt_ids: list[list[int]] = []
        resolved: list[int] = []
        for i, (text, p) in enumerate(zip(texts, prompts)):
            if text is not None:
                self.s.need_tokenizer()
                field = "prompt" if len(texts) == 1 else f"prompt[{i}]"
                pool.check_chars(len(text), field)  # before it waits for a worker
                ids = await pool.run(lambda tok, t=text, f=field: pool.encode(tok, t, f,
                                                                              add_special_tokens=add_special_tokens))
            else:
                ids = list(p)
            ids = self.s.truncate(ids, params)
            if not ids:
                raise OpenAIError(400, "the prompt is empty", param="prompt")
            resolved.append(self.s.validate(ids, params, "prompt").max_tokens or 1)
            prompt_ids.append(ids)
        return prompt_ids, resolved

    async def create(self, req: CompletionRequest, raw_request: Any) -> Any:
        self.s.check_edge(req)
        lora_name = self.s.resolve_model(req.model)
        _check_unsupported(req)
        texts, prompts = _prompts(req)
        # echo with max_tokens 0 (vLLM's, for scoring a prompt): one token is generated and dropped.
        echo_only = req.echo and req.max_tokens == 0
        params = self.s.sampling_params(req, max_tokens=1 if echo_only else req.max_tokens, logprobs=req.logprobs,
                                        extra={"prompt_logprobs": _prompt_logprobs(req)})
        prompt_ids, resolved = await self._tokenize(texts, prompts, params, req.add_special_tokens)
        # max_tokens resolved; left out, it is what the longest prompt leaves (one params for all prompts).
        params = clone_params(params, max_tokens=min(resolved))
        self.s.check_queue(len(prompt_ids), params.n, raw_request)
        request_id = response_id("cmpl", raw_request, req.request_id)
        tok = self.s.tokenizer
        echo_texts = []
        if req.echo:
            # The prompt as given, or as the model saw it when it was token ids or truncated.
            echo_texts = [text if text is not None and params.truncate_prompt_tokens is None
                          else (tok.decode(ids) if tok is not None else "") for text, ids in zip(texts, prompt_ids)]
        ctx = _CompletionContext(self.s, req, request_id, prompt_ids, params, echo_texts, lora_name, echo_only)
        if req.stream:
            return ctx.stream(await self.s.primed(ctx.outputs(raw_request)))
        return await ctx.full(raw_request)


class _StreamState:
    """Per-choice progress of a completions stream (choice k = prompt index * n + output index)."""

    def __init__(self, ctx: "_CompletionContext") -> None:
        num = len(ctx.prompt_ids) * ctx.params.n
        echo = ctx.req.echo
        self.sent_lp = [0] * num
        self.done = [False] * num
        self.echoed = [not echo] * num
        self.sent_prompt_lp = [False] * num
        self.sent_prompt_ids = [False] * num
        self.offsets = [len(ctx.echo_texts[i // ctx.params.n]) if echo else 0 for i in range(num)]
        self.completion_tokens = [0] * num
        self.cached = [0] * len(ctx.prompt_ids)


class _CompletionContext:
    def __init__(self, serving: OpenAIServing, req: CompletionRequest, request_id: str,
                 prompt_ids: list[list[int]], params: SamplingParams, echo_texts: list[str],
                 lora_name: Optional[str], echo_only: bool) -> None:
        self.s, self.req, self.id = serving, req, request_id
        self.echo_only = echo_only
        self.prompt_ids, self.params, self.echo_texts = prompt_ids, params, echo_texts
        self.engine_kwargs = serving.engine_kwargs(req, lora_name)
        self.created = now()
        self.model = req.model or serving.model_name
        self.top_n = req.logprobs
        self.logprobs = serving.logprob_formatter(req.return_tokens_as_token_ids)
        self.prompt_tokens = sum(len(p) for p in prompt_ids)

    def outputs(self, raw_request: Any) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        return self.s.outputs(self.id, self.prompt_ids, self.params, raw_request, self.engine_kwargs, self.req)

    async def full(self, raw_request: Any) -> dict[str, Any]:
        final: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(self.outputs(raw_request)) as it:
            async for i, out in it:
                final[i] = out
        choices: list[dict[str, Any]] = []
        n = self.params.n
        completion_tokens = cached = 0
        for i in range(len(self.prompt_ids)):
            out = final[i]
            cached += out.num_cached_tokens
            for c in out.outputs:
                c = self._visible(c)
                completion_tokens += len(c.token_ids)
                prefix = self.echo_texts[i] if self.req.echo else ""
                logprobs = self._echo_logprobs(i, out)
                if self.top_n is not None and c.logprobs is not None:
                    offset = _text_end(logprobs) if logprobs else len(prefix)
                    logprobs = _joined(logprobs, self.logprobs.completion(c.token_ids, c.logprobs, self.top_n, offset))
                choices.append({"index": i * n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                "prompt_logprobs": vllm_prompt_logprobs(out.prompt_logprobs)
                                if self.req.prompt_logprobs is not None else None})
                if self.req.return_token_ids:  # vLLM's: each choice's prompt and reply tokens
                    choices[-1].update(prompt_token_ids=self.prompt_ids[i], token_ids=list(c.token_ids))
        choices.sort(key=lambda ch: ch["index"])
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.prompt_tokens, completion_tokens, cached)}

    def _visible(self, c: CompletionOutput) -> CompletionOutput:
        """An echo-only request (max_tokens 0) shows none of the one token it generated."""
        if not self.echo_only:
            return c
        return replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None, delta_text="",
                       delta_token_ids=[], finish_reason="length" if c.finish_reason is not None else None)

    def _echo_logprobs(self, i: int, out: RequestOutput) -> Optional[dict[str, Any]]:
        """The echoed prompt's part of a choice's logprobs (echo with logprobs), from offset 0."""
        if not self.req.echo or self.top_n is None or out.prompt_logprobs is None:
            return None
        return self.logprobs.completion(self.prompt_ids[i], out.prompt_logprobs, self.top_n, 0)

    def _chunk(self, st: _StreamState, choices: list[dict[str, Any]], include_usage: bool, continuous: bool) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = usage(self.prompt_tokens, sum(st.completion_tokens), sum(st.cached)) if continuous else None
        return sse(body)

    def _choice_delta(self, st: _StreamState, i: int, out: RequestOutput, c: CompletionOutput) -> Optional[dict[str, Any]]:
        """The next chunk's choice for output c of prompt i (None when there is nothing to send)."""
        k = i * self.params.n + c.index
        c = self._visible(c)
        text = c.delta_text
        logprobs = None
        extra: dict[str, Any] = {}
        if not st.echoed[k]:
            text = self.echo_texts[i] + text
            st.echoed[k] = True
            logprobs = self._echo_logprobs(i, out)
            if logprobs is not None:
                st.offsets[k] = _text_end(logprobs)
        if self.req.prompt_logprobs is not None and not st.sent_prompt_lp[k] and out.prompt_logprobs is not None:
            extra["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs)
            st.sent_prompt_lp[k] = True
        new_ids = c.token_ids[st.sent_lp[k]:]
        if self.top_n is not None and c.logprobs is not None and new_ids:
            generated = self.logprobs.completion(new_ids, c.logprobs[st.sent_lp[k]:len(c.token_ids)], self.top_n,
                                                   st.offsets[k])
            st.offsets[k] += sum(len(t) for t in generated["tokens"])
            logprobs = _joined(logprobs, generated)
        if self.req.return_token_ids:  # vLLM's: the prompt's ids in a choice's first chunk, the new tokens' in each
            if new_ids:
                extra["token_ids"] = list(new_ids)
            if not st.sent_prompt_ids[k]:
                extra["prompt_token_ids"], st.sent_prompt_ids[k] = self.prompt_ids[i], True
        st.sent_lp[k] = len(c.token_ids)
        st.completion_tokens[k] = len(c.token_ids)
        if c.finish_reason is not None:
            st.done[k] = True
        if text or logprobs or extra or c.finish_reason is not None:
            if self.req.return_token_ids:
                extra.setdefault("token_ids", [])
            return {"index": k, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason, **extra}
        return None

    async def stream(self, outputs: AsyncGenerator[tuple[int, RequestOutput], None]) -> AsyncIterator[str]:
        include_usage, continuous = stream_usage(self.req.stream_options, self.s.limits.enable_force_include_usage)
        st = _StreamState(self)
        try:
            async with contextlib.aclosing(outputs) as it:
                async for i, out in it:
                    st.cached[i] = out.num_cached_tokens
                    for c in out.outputs:
                        if st.done[i * self.params.n + c.index]:
                            continue
                        choice = self._choice_delta(st, i, out, c)
                        if choice is not None:
                            yield self._chunk(st, [choice], include_usage, continuous)
            if include_usage:
                yield sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                           "choices": [], "usage": usage(self.prompt_tokens, sum(st.completion_tokens),
                                                         sum(st.cached))})
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except OpenAIError as e:
            yield sse(e.body())
            yield "data: [DONE]\n\n"

