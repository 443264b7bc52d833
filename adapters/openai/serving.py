"""OpenAI completions and chat completions over AsyncEngine: request -> prompt tokens and
SamplingParams, engine outputs -> OpenAI JSON (whole responses and SSE chunks).

Behaviour follows `vllm serve` where OpenAI's API leaves room: unknown fields are ignored, vLLM's
extra sampling fields are accepted, `max_completion_tokens` wins over `max_tokens`, usage carries
`prompt_tokens_details.cached_tokens` (the engine's prefix-cache hit), logprobs come in each
endpoint's OpenAI shape, and a client that goes away aborts its requests (their pages are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence, Union

from agentserve.grammar.tokenizer_info import UNICODE_TO_BYTE as BYTE_DECODER
from agentserve.adapters.openai.constraint_errors import constraint_param
from agentserve.adapters.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from agentserve.adapters.openai.tool_calls import ToolCallStream, check_tool_schemas, tool_format_of
from agentserve.chat import limits as L
from agentserve.chat.render_pool import RenderPool
from agentserve.engine.async_engine import EngineDeadError, QueueFullError
from agentserve.service.tenants import tenant_of_scope
from agentserve.engine.engine import InvalidRequestError
from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_N = 128
ROLES = ("system", "developer", "user", "assistant", "tool")
_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "max_tokens", "min_tokens", "logprobs", "stop", "stop_token_ids", "seed",
           "choice", "tool_choice", "json_schema", "regex")


class ClientDisconnected(Exception):
    """The HTTP client went away; its requests were aborted."""


_DONE = object()
_GONE = object()


def _now() -> int:
    return int(time.time())


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return f"data: {_json(obj)}\n\n"


def _param_of(message: str) -> Optional[str]:
    """The request field a SamplingParams/engine message is about (its first word, when a field)."""
    first = message.split(" ", 1)[0].strip(":,")
    return first if first in _FIELDS else None


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _clone(params: SamplingParams, **changes: Any) -> SamplingParams:
    try:
        return params.clone(**changes)
    except ValueError as e:  # e.g. min_tokens above the max_tokens a long prompt leaves
        msg = str(e)
        raise OpenAIError(400, msg, param=_param_of(msg)) from None


def _clamp(lp: float) -> float:
    return max(lp, -9999.0)  # -inf is not JSON


async def _wait_disconnect(raw_request: Any) -> None:
    """Returns when the client has gone (or the response is complete: uvicorn then answers
    http.disconnect as well; by then nothing is left to abort)."""
    while True:
        message = await raw_request.receive()
        if message.get("type") == "http.disconnect":
            return


class OpenAIServing:
    def __init__(self, async_engine: Any, config: Any, metrics: Any, render_pool: RenderPool) -> None:
        self.aeng = async_engine
        self.engine = async_engine.engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = self.engine.tokenizer
        self.model_name: str = self.engine.model_name
        aliases = {self.model_name, *config.model.accepted_model_names()}
        if getattr(self.engine, "model_path", None) is not None:
            aliases.add(str(self.engine.model_path))
        self.model_aliases = aliases
        self.created = _now()
        # Chat templates and tokenization are CPU work: in the render pool (shared with gRPC), off the
        # event loop and the step thread, so streaming never stalls behind a long prompt.
        self.render_pool = render_pool
        self.limits = config.server
        self._tool_fmt: Optional[str] = None  # detected lazily ("" when unknown)

    # --- models -------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """LoRA adapters the engine can serve, duck-typed (the LoRA manager is optional)."""
        mgr = getattr(self.engine, "lora_manager", None) or getattr(self.engine, "lora", None)
        if mgr is None:
            return []
        for name in ("adapter_names", "list_adapters", "names"):
            fn = getattr(mgr, name, None)
            if callable(fn):
                try:
                    return [getattr(a, "name", a) for a in fn()]
                except TypeError:
                    continue
        adapters = getattr(mgr, "adapters", None)
        if isinstance(adapters, dict):
            return list(adapters)
        return []

    def list_models(self) -> dict[str, Any]:
        root = str(getattr(self.engine, "model_path", None) or self.config.model.model)
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "agentserve",
                 "root": root, "parent": None, "max_model_len": self.engine.max_model_len}
                for name in self.config.model.served_model_names()]
        for name in self.adapter_names():
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "agentserve",
                         "root": name, "parent": self.model_name, "max_model_len": self.engine.max_model_len})
        return {"object": "list", "data": data}

    def get_model(self, name: str) -> dict[str, Any]:
        for m in self.list_models()["data"]:
            if m["id"] == name:
                return m
        raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def resolve_model(self, name: Optional[str]) -> Optional[str]:
        """The LoRA adapter a request's model names (None: the base model); 404 when unknown."""
        if name is None or name in self.model_aliases:
            return None
        if name in self.adapter_names():
            return name
        raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    # --- request -> engine --------------------------------------------------------------------------
    def _check_queue(self, num: int) -> None:
        if self.aeng.num_pending + num > self.aeng.max_pending:
            raise OpenAIError(503, f"The server is overloaded: {self.aeng.num_pending} requests in flight "
                                   f"(limit {self.aeng.max_pending}). Retry later.", code="queue_full")

    def _constraint(self, req: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            kw["json_object"] = True
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise OpenAIError(400, "response_format.json_schema is required when type is 'json_schema'",
                                  param="response_format.json_schema")
            schema = rf.json_schema.json_schema
            if schema is None:
                kw["json_object"] = True
            else:
                kw["json_schema"] = schema
        if req.guided_json is not None:
            schema = req.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise OpenAIError(400, f"guided_json is not valid JSON: {e}", param="guided_json") from None
            kw["json_schema"] = schema
        if req.guided_regex is not None:
            kw["regex"] = req.guided_regex
        if req.guided_choice is not None:
            kw["choice"] = req.guided_choice
        given = [k for k in ("response_format", "guided_json", "guided_regex", "guided_choice")
                 if getattr(req, k) is not None and not (k == "response_format" and req.response_format.type == "text")]
        if len(given) > 1:
            raise OpenAIError(400, f"give at most one output constraint; got {', '.join(given)}", param=given[1])
        return kw

    def _sampling_params(self, req: Any, *, max_tokens: Optional[int], logprobs: Optional[int],
                         extra: Optional[dict[str, Any]] = None) -> SamplingParams:
        if req.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        if req.n > MAX_N:
            raise OpenAIError(400, f"n must be at most {MAX_N}, got {req.n}", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if req.stream_options is not None and not req.stream:
            raise OpenAIError(400, "stream_options can only be given when stream is true", param="stream_options")
        kw: dict[str, Any] = dict(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
        kw.update(self._constraint(req))
        kw.update(extra or {})
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise OpenAIError(400, msg, param=_param_of(msg)) from None

    def _validate(self, prompt_ids: Sequence[int], params: SamplingParams, what: str) -> SamplingParams:
        n, limit = len(prompt_ids), self.engine.max_model_len
        if params.max_tokens is None:
            # Not given: up to the context limit, or to what the KV cache can hold for one sequence.
            capacity = self.engine.pool.num_blocks * self.engine.pool.block_size
            if n < min(limit, capacity):
                params = _clone(params, max_tokens=min(limit, capacity) - n)
        if n >= limit:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                                   f"resulted in {n} tokens. Please reduce the length of the {what}.",
                              param=what, code="context_length_exceeded")
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                   f"{n + params.max_tokens} tokens ({n} in the {what}, {params.max_tokens} in the "
                                   f"completion). Please reduce the length of the {what} or completion.",
                              param="max_tokens", code="context_length_exceeded")
        try:
            return self.engine.validate(prompt_ids, params)  # reads only immutable engine state
        except ValueError as e:  # a sampling field checked against the vocabulary, else the prompt
            raise OpenAIError(400, str(e), param=_param_of(str(e)) or what) from None

    def _check_edge(self, req: Any) -> None:
        """Limits and string validity that hold for both endpoints, before any work that grows with
        the request's size: every string valid UTF-8, stop strings, JSON schemas."""
        L.check_utf8(req.model_dump(exclude_none=True, by_alias=True), "")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        L.check_stop(stop, self.limits)
        if req.response_format is not None and req.response_format.json_schema is not None \
                and req.response_format.json_schema.json_schema is not None:
            L.check_schema(req.response_format.json_schema.json_schema, "response_format.json_schema.schema",
                           self.limits)
        if req.guided_json is not None:
            L.check_schema(req.guided_json, "guided_json", self.limits)

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer: send prompts as token id lists", param="prompt")
        return self.tokenizer

    # --- running ------------------------------------------------------------------------------------
    async def _outputs(self, request_id: str, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       raw_request: Any, engine_kwargs: dict[str, Any],
                       req: Union[ChatCompletionRequest, CompletionRequest]
                       ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Runs one engine request per prompt; yields (prompt index, output) as they come. When the
        client disconnects (or this iterator is closed or cancelled) every request is aborted."""
        if raw_request is not None:  # the caller's tenant namespaces the pages (its salt refines the request's)
            tenant = tenant_of_scope(raw_request.scope)
            engine_kwargs = dict(engine_kwargs, cache_salt=tenant.cache_salt(engine_kwargs.get("cache_salt")))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, rid: str, ids: Sequence[int]) -> None:
            try:
                async for out in self.aeng.generate(rid, list(ids), params, **engine_kwargs):
                    queue.put_nowait((i, out))
                queue.put_nowait((i, _DONE))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, e))

        pumps = [asyncio.create_task(pump(i, request_id if len(prompts) == 1 else f"{request_id}-{i}", ids))
                 for i, ids in enumerate(prompts)]

        async def watch() -> None:
            await _wait_disconnect(raw_request)
            for t in pumps:  # abort at once, even if nobody is iterating us right now
                t.cancel()
            queue.put_nowait((-1, _GONE))

        watcher = asyncio.create_task(watch()) if raw_request is not None else None
        try:
            remaining = len(pumps)
            while remaining:
                i, item = await queue.get()
                if item is _GONE:
                    raise ClientDisconnected()
                if item is _DONE:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise self._engine_error(item)
                if getattr(item, "error", None):
                    # A request that failed alone (e.g. a constraint that does not compile).
                    msg = str(item.error)
                    raise OpenAIError(400, msg, param=constraint_param(req, msg) or _param_of(msg))
                yield i, item
        finally:
            if watcher is not None:
                watcher.cancel()
            for t in pumps:
                t.cancel()

    @staticmethod
    async def _primed(it: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Waits for the first output before a stream's headers go out, so that what fails before
        generation starts (queue full, a constraint that does not compile, ...) still gets its HTTP
        status; returns an iterator that replays it. The first chunk of a stream carries the first
        token anyway, so this costs no latency."""
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await it.aclose()  # type: ignore[attr-defined]
            raise

        async def replay() -> AsyncIterator[Any]:
            try:
                if first is not None:
                    yield first
                    async for item in it:
                        yield item
            finally:
                await it.aclose()  # type: ignore[attr-defined]

        return replay()

    @staticmethod
    def _engine_error(e: BaseException) -> BaseException:
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, QueueFullError):
            return OpenAIError(503, f"The server is overloaded: {e}. Retry later.", code="queue_full")
        if isinstance(e, EngineDeadError):
            return OpenAIError(503, str(e), code="engine_unavailable")
        if isinstance(e, (InvalidRequestError, ValueError)):
            msg = str(e)
            return OpenAIError(400, msg, param=_param_of(msg))
        logger.error("request failed: %r", e)
        return OpenAIError(500, f"internal error: {e}")

    def _engine_kwargs(self, req: Any, lora_name: Optional[str]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if lora_name is not None:
            kw["lora_name"] = lora_name
        if req.cache_salt:
            kw["cache_salt"] = req.cache_salt
        if req.priority:
            kw["priority"] = req.priority
        return kw

    def _record_finish(self, reason: Optional[str]) -> None:
        if self.metrics is not None and reason is not None:
            self.metrics.finished.labels(reason).inc()

    # --- logprobs -----------------------------------------------------------------------------------
    def _token_text(self, token_id: int, lp: Any) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def _token_bytes(self, token_id: int, text: str) -> list[int]:
        """A token's own bytes: for a token that is part of a multi-byte character its decoded text is
        U+FFFD, so read the bytes off the vocabulary piece (byte-level BPE or sentencepiece <0xNN>)."""
        if "\ufffd" not in text or self.tokenizer is None:
            return list(text.encode("utf-8"))
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
        except Exception:  # noqa: BLE001 - fall back to the text
            piece = None
        if isinstance(piece, str) and piece:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                with contextlib.suppress(ValueError):
                    return [int(piece[3:5], 16)]
            decoder = BYTE_DECODER
            if all(c in decoder for c in piece):
                return [decoder[c] for c in piece]
        return list(text.encode("utf-8"))

    def _chat_logprobs(self, token_ids: Sequence[int], positions: Sequence[dict], top_n: int) -> list[dict]:
        content = []
        for tid, pos in zip(token_ids, positions):
            lp = pos.get(tid)
            text = self._token_text(tid, lp)
            top = sorted(pos.items(), key=lambda kv: kv[1].rank)
            top_list = []
            for other_id, other in top:
                if 1 <= other.rank <= top_n and len(top_list) < top_n:
                    t = self._token_text(other_id, other)
                    top_list.append({"token": t, "logprob": _clamp(other.logprob),
                                     "bytes": self._token_bytes(other_id, t)})
            content.append({"token": text, "logprob": _clamp(lp.logprob if lp is not None else float("-inf")),
                            "bytes": self._token_bytes(tid, text), "top_logprobs": top_list})
        return content

    def _completion_logprobs(self, token_ids: Sequence[int], positions: Sequence[dict], top_n: int,
                             offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, pos in zip(token_ids, positions):
            lp = pos.get(tid)
            text = self._token_text(tid, lp)
            tokens.append(text)
            token_lps.append(_clamp(lp.logprob if lp is not None else float("-inf")))
            top: dict[str, float] = {}
            for other_id, other in sorted(pos.items(), key=lambda kv: kv[1].rank):
                if other_id == tid or 1 <= other.rank <= top_n:
                    top.setdefault(self._token_text(other_id, other), _clamp(other.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # --- completions --------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw_request: Any) -> Any:
        self._check_edge(req)
        lora_name = self.resolve_model(req.model)
        if req.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError(400, f"best_of must equal n (got best_of={req.best_of}, n={req.n}); best_of > n is "
                                   "not supported", param="best_of")
        if req.echo and req.logprobs is not None:
            raise OpenAIError(400, "echo together with logprobs (prompt logprobs) is not supported", param="echo")
        prompt = req.prompt
        if isinstance(prompt, str):
            texts: list[Optional[str]] = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)  # type: ignore[arg-type]
        elif prompt and all(isinstance(p, int) for p in prompt):
            texts = [None]
            prompt = [prompt]  # type: ignore[list-item]
        elif prompt and all(isinstance(p, list) for p in prompt):
            texts = [None] * len(prompt)
        else:
            raise OpenAIError(400, "prompt must be a non-empty string, list of strings, list of token ids or "
                                   "list of token id lists", param="prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        params = self._sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
        pool = self.render_pool
        prompt_ids: list[list[int]] = []
        resolved: list[int] = []
        for i, (text, p) in enumerate(zip(texts, prompt)):  # type: ignore[arg-type]
            if text is not None:
                self._need_tokenizer()
                field = "prompt" if len(texts) == 1 else f"prompt[{i}]"
                pool.check_chars(len(text), field)  # before it waits for a worker
                ids = await pool.run(lambda tok, t=text, f=field: pool.encode(tok, t, f, add_special_tokens=True))
            else:
                ids = list(p)  # type: ignore[arg-type]
            if not ids:
                raise OpenAIError(400, "the prompt is empty", param="prompt")
            resolved.append(self._validate(ids, params, "prompt").max_tokens or 1)
            prompt_ids.append(ids)
        # max_tokens resolved; left out, it is what the longest prompt leaves (one params for all prompts).
        params = _clone(params, max_tokens=min(resolved))
        self._check_queue(len(prompt_ids))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        echo_texts = []
        if req.echo:
            for text, ids in zip(texts, prompt_ids):
                echo_texts.append(text if text is not None else
                                  (self.tokenizer.decode(ids) if self.tokenizer is not None else ""))
        ctx = _CompletionContext(self, req, request_id, prompt_ids, params, echo_texts, lora_name)
        if req.stream:
            return ctx.stream(await self._primed(ctx._outputs(raw_request)))
        return await ctx.full(raw_request)

    # --- chat ---------------------------------------------------------------------------------------
    def _tool_format(self) -> Optional[str]:
        if self._tool_fmt is None:
            self._tool_fmt = tool_format_of(self.tokenizer) or ""
        return self._tool_fmt or None

    @staticmethod
    def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not messages:
            raise OpenAIError(400, "messages must be a non-empty list", param="messages")
        out = []
        for i, m in enumerate(messages):
            at = f"messages[{i}]"
            if not isinstance(m, dict):
                raise OpenAIError(400, f"{at} must be an object", param=at)
            role = m.get("role")
            if role not in ROLES:
                raise OpenAIError(400, f"{at}.role must be one of {', '.join(ROLES)}; got {role!r}",
                                  param=f"{at}.role")
            msg = {k: v for k, v in m.items() if k not in ("role", "content", "tool_calls")}
            msg["role"] = "system" if role == "developer" else role
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if isinstance(part, str):
                        parts.append(part)
                    elif isinstance(part, dict) and part.get("type") in ("text", "input_text") \
                            and isinstance(part.get("text"), str):
                        parts.append(part["text"])
                    else:
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise OpenAIError(400, f"{at}.content[{j}]: content parts of type {kind!r} are not "
                                               "supported (this model takes text only)",
                                          param=f"{at}.content[{j}].type")
                content = "\n".join(parts)
            elif content is not None and not isinstance(content, str):
                raise OpenAIError(400, f"{at}.content must be a string, a list of content parts or null",
                                  param=f"{at}.content")
            tool_calls = m.get("tool_calls") or []
            if tool_calls and role != "assistant":
                raise OpenAIError(400, f"{at}: only assistant messages carry tool_calls", param=f"{at}.tool_calls")
            if content is None and role not in ("assistant",):
                raise OpenAIError(400, f"{at} ({role}) needs content", param=f"{at}.content")
            msg["content"] = content
            if tool_calls:
                if not isinstance(tool_calls, list):
                    raise OpenAIError(400, f"{at}.tool_calls must be a list", param=f"{at}.tool_calls")
                calls = []
                for j, tc in enumerate(tool_calls):
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                        raise OpenAIError(400, f"{at}.tool_calls[{j}].function.name is required",
                                          param=f"{at}.tool_calls[{j}].function.name")
                    args = fn.get("arguments", "{}")
                    if isinstance(args, str):
                        # Templates write arguments with tojson: give them the object (as vLLM does).
                        try:
                            parsed = json.loads(args or "{}")
                            args = parsed if isinstance(parsed, dict) else args
                        except json.JSONDecodeError:
                            pass
                    calls.append({"id": tc.get("id") or f"call_{i}_{j}", "type": "function",
                                  "function": {"name": fn["name"], "arguments": args}})
                msg["tool_calls"] = calls
            out.append(msg)
        return out

    @staticmethod
    def _check_tools(req: ChatCompletionRequest) -> tuple[Optional[list[dict[str, Any]]], Any]:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        names = [t["function"]["name"] for t in tools or []]
        if len(set(names)) != len(names):
            raise OpenAIError(400, "tools declares a function name twice", param="tools")
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise OpenAIError(400, f"tool_choice must be 'none', 'auto', 'required' or "
                                       f"{{'type': 'function', 'function': {{'name': ...}}}}; got {choice!r}",
                                  param="tool_choice")
        elif isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if choice.get("type", "function") != "function" or not isinstance(name, str):
                raise OpenAIError(400, "tool_choice must name a function: {'type': 'function', 'function': "
                                       "{'name': ...}}", param="tool_choice")
            if name not in names:
                raise OpenAIError(400, f"tool_choice names the function {name!r}, which is not in tools",
                                  param="tool_choice")
        if choice not in (None, "none") and not tools:
            raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
        if tools and choice is None:
            choice = "auto"
        if tools and choice != "none":
            check_tool_schemas(tools)
        return tools, choice

    def _template_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """Extra chat-template variables; a client-supplied template only with --trust-request-chat-template
        (a template is a program: a few bytes of Jinja can expand to megabytes)."""
        kwargs = dict(req.chat_template_kwargs or {})
        template = kwargs.pop("chat_template", None)
        field = "chat_template_kwargs.chat_template"
        if req.chat_template is not None:
            template, field = req.chat_template, "chat_template"
        if template is not None:
            if not self.limits.trust_request_chat_template:
                raise OpenAIError(400, f"{field}: this server does not accept chat templates in requests (start "
                                       "it with --trust-request-chat-template to allow them)", param=field)
            if not isinstance(template, str):
                raise OpenAIError(400, f"{field} must be a string", param=field)
            kwargs["chat_template"] = template
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        return kwargs

    def _render_chat(self, tok: Any, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]],
                     req: ChatCompletionRequest, kwargs: dict[str, Any]) -> list[int]:
        """A render pool worker: the messages through the chat template, then tokenized."""
        pool = self.render_pool
        text = pool.render(tok, messages, tools, add_generation_prompt=req.add_generation_prompt, **kwargs)
        return pool.encode(tok, text, "messages", add_special_tokens=False)

    async def chat(self, req: ChatCompletionRequest, raw_request: Any) -> Any:
        self._check_edge(req)
        L.check_count(len(req.messages), self.limits.max_messages, "messages", "max-messages")
        L.check_count(len(req.tools or ()), self.limits.max_tools, "tools", "max-tools")
        for i, t in enumerate(req.tools or ()):
            if t.function.parameters is not None:
                L.check_schema(t.function.parameters, f"tools[{i}].function.parameters", self.limits)
        lora_name = self.resolve_model(req.model)
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="messages")
        if req.continue_final_message and req.add_generation_prompt:
            raise OpenAIError(400, "continue_final_message needs add_generation_prompt=false",
                              param="continue_final_message")
        template_kwargs = self._template_kwargs(req)
        messages = self._normalize_messages(req.messages)
        self.render_pool.check_messages(messages)
        tools, tool_choice = self._check_tools(req)
        top_n = 0
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise OpenAIError(400, f"top_logprobs must be in [0, 20], got {req.top_logprobs}",
                                  param="top_logprobs")
            top_n = req.top_logprobs
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        parse_tools = bool(tools) and tool_choice != "none"
        extra: dict[str, Any] = {}
        if parse_tools:
            extra = {"tools": tools, "tool_choice": tool_choice}
            if "parallel_tool_calls" in SamplingParams.__dataclass_fields__:
                extra["parallel_tool_calls"] = req.parallel_tool_calls
            fmt = self._tool_format()
            if fmt is not None and self._marker_is_special(fmt):
                # The call opener is a special token ([TOOL_CALLS], <|python_tag|>): keep it in the text.
                extra["skip_special_tokens"] = False
        try:
            params = self._sampling_params(req, max_tokens=max_tokens, logprobs=top_n if req.logprobs else None,
                                           extra=extra)
        except OpenAIError as e:
            if e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
            raise
        prompt_ids = await self.render_pool.run(lambda tok: self._render_chat(tok, messages, tools, req, template_kwargs))
        params = self._validate(prompt_ids, params, "messages")
        self._check_queue(1)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        ctx = _ChatContext(self, req, request_id, prompt_ids, params, lora_name,
                           tools if parse_tools else None, tool_choice, top_n)
        if req.stream:
            return ctx.stream(await self._primed(ctx._outputs(raw_request)))
        return await ctx.full(raw_request)

    def _marker_is_special(self, fmt: str) -> bool:
        """Whether the format's call opener is a special token (Mistral's [TOOL_CALLS], Llama's
        <|python_tag|>), which skip_special_tokens would drop from the text the parser reads."""
        marker = {"mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>", "hermes": "<tool_call>"}.get(fmt)
        if marker is None or self.tokenizer is None:
            return False
        # all_special_tokens lists only the named ones (bos, eos, ...) in transformers 5.
        for added in (getattr(self.tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "content", None) == marker:
                return bool(getattr(added, "special", False))
        return marker in set(getattr(self.tokenizer, "all_special_tokens", []) or [])


# --- response builders ------------------------------------------------------------------------------


class _CompletionContext:
    def __init__(self, serving: OpenAIServing, req: CompletionRequest, request_id: str,
                 prompt_ids: list[list[int]], params: SamplingParams, echo_texts: list[str],
                 lora_name: Optional[str]) -> None:
        self.s, self.req, self.id = serving, req, request_id
        self.prompt_ids, self.params, self.echo_texts = prompt_ids, params, echo_texts
        self.engine_kwargs = serving._engine_kwargs(req, lora_name)
        self.created = _now()
        self.model = req.model or serving.model_name
        self.top_n = req.logprobs

    def _outputs(self, raw_request: Any) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self.s._outputs(self.id, self.prompt_ids, self.params, raw_request, self.engine_kwargs, self.req)

    async def full(self, raw_request: Any) -> dict[str, Any]:
        final: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(self._outputs(raw_request)) as it:
            async for i, out in it:
                final[i] = out
        choices = []
        n = self.params.n
        prompt_tokens = completion_tokens = cached = 0
        for i in range(len(self.prompt_ids)):
            out = final[i]
            prompt_tokens += len(self.prompt_ids[i])
            cached += out.num_cached_tokens
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                prefix = self.echo_texts[i] if self.req.echo else ""
                logprobs = None
                if self.top_n is not None and c.logprobs is not None:
                    logprobs = self.s._completion_logprobs(c.token_ids, c.logprobs, self.top_n, len(prefix))
                choices.append({"index": i * n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                self.s._record_finish(c.finish_reason)
        choices.sort(key=lambda ch: ch["index"])
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens, cached)}

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        n = self.params.n
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts and opts.continuous_usage_stats)
        num = len(self.prompt_ids) * n
        sent_lp = [0] * num
        done = [False] * num
        echoed = [not self.req.echo] * num
        offsets = [len(self.echo_texts[i // n]) if self.req.echo else 0 for i in range(num)]
        completion_tokens = [0] * num
        cached = [0] * len(self.prompt_ids)
        prompt_tokens = sum(len(p) for p in self.prompt_ids)

        def chunk(choices: list[dict[str, Any]]) -> str:
            body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                    "model": self.model, "choices": choices}
            if include_usage:
                body["usage"] = _usage(prompt_tokens, sum(completion_tokens), sum(cached)) if continuous else None
            return _sse(body)

        try:
            async with contextlib.aclosing(outputs) as it:
                async for i, out in it:
                    cached[i] = out.num_cached_tokens
                    for c in out.outputs:
                        k = i * n + c.index
                        if done[k]:
                            continue
                        text = c.delta_text
                        if not echoed[k]:
                            text = self.echo_texts[i] + text
                            echoed[k] = True
                        logprobs = None
                        new_ids = c.token_ids[sent_lp[k]:]
                        if self.top_n is not None and c.logprobs is not None and new_ids:
                            logprobs = self.s._completion_logprobs(
                                new_ids, c.logprobs[sent_lp[k]:len(c.token_ids)], self.top_n, offsets[k])
                            offsets[k] += sum(len(t) for t in logprobs["tokens"])
                        sent_lp[k] = len(c.token_ids)
                        completion_tokens[k] = len(c.token_ids)
                        if text or logprobs or c.finish_reason is not None:
                            yield chunk([{"index": k, "text": text, "logprobs": logprobs,
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
                        if c.finish_reason is not None:
                            done[k] = True
                            self.s._record_finish(c.finish_reason)
            if include_usage:
                yield _sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                            "choices": [], "usage": _usage(prompt_tokens, sum(completion_tokens), sum(cached))})
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except OpenAIError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"


class _ChatContext:
    def __init__(self, serving: OpenAIServing, req: ChatCompletionRequest, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, lora_name: Optional[str], tools: Optional[list[dict[str, Any]]],
                 tool_choice: Any, top_n: int) -> None:
        self.s, self.req, self.id = serving, req, request_id
        self.prompt_ids, self.params = prompt_ids, params
        self.engine_kwargs = serving._engine_kwargs(req, lora_name)
        self.tools, self.tool_choice = tools, tool_choice
        # With special tokens kept in the text (for a special tool-call opener), the EOS token that
        # ended the reply would be in it too: strip it, as it is when special tokens are skipped.
        tok = serving.tokenizer
        self.eos_texts: tuple[str, ...] = ()
        if tools and not params.skip_special_tokens and tok is not None:
            ids = sorted(serving.engine.eos_token_ids)
            self.eos_texts = tuple(t for t in (tok.convert_ids_to_tokens(ids) or []) if t)
        self.top_n = top_n
        self.created = _now()
        self.model = req.model or serving.model_name

    def _outputs(self, raw_request: Any) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self.s._outputs(self.id, [self.prompt_ids], self.params, raw_request, self.engine_kwargs,
                               self.req)

    def _tool_stream(self) -> Optional[ToolCallStream]:
        if not self.tools:
            return None
        return ToolCallStream(self.s._tool_format(), self.tools, self.tool_choice,
                              parallel=self.req.parallel_tool_calls)

    def _strip_eos(self, text: str, c: CompletionOutput) -> str:
        if self.eos_texts and c.finish_reason == "stop" and c.stop_reason is None:
            for eos in self.eos_texts:
                if text.endswith(eos):
                    return text[:-len(eos)]
        return text

    def _safe_text(self, c: CompletionOutput, k: int, acc: list[str], fed: list[int]) -> str:
        """The next piece of choice k's text for the parser: with special tokens kept, a tail that may
        be the start of the EOS text waits until the next delta shows what it is."""
        acc[k] += c.delta_text
        text = acc[k]
        if c.finish_reason is not None:
            upto = len(self._strip_eos(text, c))
        else:
            hold = 0
            for eos in self.eos_texts:
                for n in range(min(len(eos), len(text)), 0, -1):
                    if text.endswith(eos[:n]):
                        hold = max(hold, n)
                        break
            upto = len(text) - hold
        piece = text[fed[k]:upto] if upto > fed[k] else ""
        fed[k] = max(fed[k], upto)
        return piece

    def _finish_reason(self, c: CompletionOutput, has_calls: bool) -> Optional[str]:
        reason = c.finish_reason
        if has_calls and reason == "stop" and not isinstance(self.tool_choice, dict):
            return "tool_calls"  # OpenAI answers "stop" for a named tool_choice, "tool_calls" otherwise
        return reason

    async def full(self, raw_request: Any) -> dict[str, Any]:
        final: Optional[RequestOutput] = None
        async with contextlib.aclosing(self._outputs(raw_request)) as it:
            async for _, out in it:
                final = out
        assert final is not None
        choices = []
        completion_tokens = 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            calls: list[dict[str, Any]] = []
            ts = self._tool_stream()
            if ts is not None:
                content, calls = ts.parse_whole(self._strip_eos(c.text, c))
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
            logprobs = None
            if self.req.logprobs and c.logprobs is not None:
                logprobs = {"content": self.s._chat_logprobs(c.token_ids, c.logprobs, self.top_n)}
            reason = self._finish_reason(c, bool(calls))
            choices.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                            "stop_reason": c.stop_reason})
            self.s._record_finish(reason)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices,
                "usage": _usage(len(self.prompt_ids), completion_tokens, final.num_cached_tokens)}

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        n = self.params.n
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts and opts.continuous_usage_stats)
        started = [False] * n
        done = [False] * n
        sent_lp = [0] * n
        completion_tokens = [0] * n
        streams = [self._tool_stream() for _ in range(n)]
        has_calls = [False] * n
        acc = [""] * n  # streamed text per choice, and how much of it went to the tool-call parser
        fed = [0] * n
        prompt_tokens = len(self.prompt_ids)
        cached = 0

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: Optional[str] = None,
                  stop_reason: Any = None) -> str:
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                    "model": self.model, "choices": [choice]}
            if include_usage:
                body["usage"] = _usage(prompt_tokens, sum(completion_tokens), cached) if continuous else None
            return _sse(body)

        try:
            async with contextlib.aclosing(outputs) as it:
                async for _, out in it:
                    cached = out.num_cached_tokens
                    for c in out.outputs:
                        k = c.index
                        if done[k]:
                            continue
                        if not started[k]:
                            started[k] = True
                            yield chunk(k, {"role": "assistant", "content": ""})
                        logprobs = None
                        new_ids = c.token_ids[sent_lp[k]:]
                        if self.req.logprobs and c.logprobs is not None and new_ids:
                            logprobs = {"content": self.s._chat_logprobs(
                                new_ids, c.logprobs[sent_lp[k]:len(c.token_ids)], self.top_n)}
                        sent_lp[k] = len(c.token_ids)
                        completion_tokens[k] = len(c.token_ids)
                        finished = c.finish_reason is not None
                        ts = streams[k]
                        if ts is None:
                            if c.delta_text or logprobs:
                                yield chunk(k, {"content": c.delta_text}, logprobs)
                        else:
                            deltas = ts.feed(self._safe_text(c, k, acc, fed))
                            if finished:
                                deltas += ts.finish()
                            for j, d in enumerate(deltas):
                                if "tool_calls" in d:
                                    has_calls[k] = True
                                yield chunk(k, d, logprobs if j == 0 else None)
                            if not deltas and logprobs:
                                yield chunk(k, {"content": ""}, logprobs)
                        if finished:
                            done[k] = True
                            reason = self._finish_reason(c, has_calls[k])
                            self.s._record_finish(reason)
                            yield chunk(k, {}, None, reason, c.stop_reason)
            if include_usage:
                yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [],
                            "usage": _usage(prompt_tokens, sum(completion_tokens), cached)})
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except OpenAIError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"


__all__ = ["OpenAIServing", "ClientDisconnected"]
