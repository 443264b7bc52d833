"""The request plumbing both OpenAI endpoints share (completions.py, chat.py): models and LoRA
adapters, request fields -> SamplingParams, context-length checks, running engine requests with
aborts on disconnect, engine errors -> OpenAI errors.

Behaviour follows `vllm serve` where OpenAI's API leaves room: unknown fields are ignored, vLLM's
extra sampling fields are accepted, `max_completion_tokens` wins over `max_tokens`, usage carries
`prompt_tokens_details.cached_tokens` (the engine's prefix-cache hit), logprobs come in each
endpoint's OpenAI shape, and a client that goes away aborts its requests (their pages are freed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncGenerator, Optional, Sequence, Union

from agentserve.adapters.openai.constraint_errors import COMPILE_FAILED, constraint_param, request_failure
from agentserve.adapters.openai.logprobs import LogprobFormatter
from agentserve.adapters.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, checked_cache_salt
from agentserve.adapters.openai.structured_outputs import constraint_documents, constraint_kwargs
from agentserve.adapters.openai.request_ids import engine_request_id
from agentserve.adapters.openai.vllm_unsupported import check_vllm_unsupported
from agentserve.chat import limits as L
from agentserve.chat.render_pool import RenderPool
from agentserve.errors import AdapterNotFoundError, EngineDeadError, FieldError, InvalidRequestError, QueueFullError
from agentserve.engine.validation import truncate_prompt
from agentserve.lora.interface import adapter_names, adapter_root
from agentserve.outputs import RequestOutput
from agentserve.service.tenants import TenantLimitError, held_slot_of_scope, tenant_of_scope
from agentserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_N = 128
_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens",
           "stop", "stop_token_ids", "seed", "choice", "tool_choice", "json_schema", "regex", "grammar", "logit_bias",
           "allowed_token_ids", "bad_words", "thinking_token_budget")
# SamplingParams' names of the output constraints: an error naming one is about the request field that gave it.
_CONSTRAINT_KEYS = ("choice", "json_schema", "regex", "grammar", "structural_tag")


def token_bias(logit_bias: Optional[dict[str, float]]) -> Optional[dict[int, float]]:
    """OpenAI's logit_bias keys are token ids as JSON strings ("50256"): ints for SamplingParams."""
    if not logit_bias:
        return None
    bias: dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise OpenAIError(400, f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                              param="logit_bias") from None
    return bias

class ClientDisconnected(Exception):
    """The HTTP client went away; its requests were aborted."""


_DONE = object()
_GONE = object()


def now() -> int:
    return int(time.time())


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> str:
    return f"data: {json_dumps(obj)}\n\n"


def param_of(message: str) -> Optional[str]:
    """The request field a SamplingParams/engine message is about (its first word, when a field)."""
    first = message.split(" ", 1)[0].strip(":,")
    return first if first in _FIELDS else None


def clone_params(params: SamplingParams, **changes: Any) -> SamplingParams:
    try:
        return params.clone(**changes)
    except ValueError as e:  # e.g. min_tokens above the max_tokens a long prompt leaves
        msg = str(e)
        raise OpenAIError(400, msg, param=param_of(msg)) from None


async def wait_disconnect(raw_request: Any) -> None:
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
        if self.engine.model_path is not None:
            aliases.add(str(self.engine.model_path))
        self.model_aliases = aliases
        self.created = now()
        # Chat templates and tokenization are CPU work: in the render pool (shared with gRPC), off the
        # event loop and the step thread, so streaming never stalls behind a long prompt.
        self.render_pool = render_pool
        self.limits = config.server
        self._logprob_formatters = {False: LogprobFormatter(self.tokenizer),
                                   True: LogprobFormatter(self.tokenizer, tokens_as_ids=True)}

    def logprob_formatter(self, tokens_as_ids: Optional[bool]) -> LogprobFormatter:
        """The request's return_tokens_as_token_ids, or the server's when it leaves it unset."""
        return self._logprob_formatters[self.limits.return_tokens_as_token_ids if tokens_as_ids is None
                                       else tokens_as_ids]

    # --- models -------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """LoRA adapters the engine can serve (none without a LoRA manager)."""
        return adapter_names(self.engine.lora_manager)

    def list_models(self) -> dict[str, Any]:
        base_root = str(self.engine.model_path or self.config.model.model)
        cards: list[tuple[str, Optional[str], Optional[str]]] = [
            (name, base_root, None) for name in self.config.model.served_model_names()]
        cards += [(name, adapter_root(self.engine.lora_manager, name), self.model_name) for name in self.adapter_names()]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "agentserve",
                                            "root": root, "parent": parent, "max_model_len": self.engine.max_model_len}
                                           for name, root, parent in cards]}

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
    def check_queue(self, num_prompts: int, n: int, raw_request: Any = None) -> None:
        """The queue bound counts sequences (prompts x n, as vLLM V1's scheduler holds them): a request that
        alone exceeds it is a 400 (retrying cannot help), one that does not fit beside the others a 503.
        The caller's tenant holds as many of its request slots (429 past its limit)."""
        num, limit, pending = num_prompts * n, self.aeng.max_pending, self.aeng.num_pending
        slot = held_slot_of_scope(raw_request.scope) if raw_request is not None else None
        if slot is not None and num > 1:
            try:
                slot.widen(num)
            except TenantLimitError as e:
                raise OpenAIError(429, str(e), code="rate_limit_exceeded") from None
        if num > limit and num > 1:
            raise OpenAIError(400, f"this request asks for {num} sequences ({num_prompts} prompts x n={n}); the "
                                   f"server queues at most {limit} (--max-waiting): send fewer prompts or a smaller n",
                              param="prompt" if num_prompts > 1 else "n")
        if pending + num > limit:
            raise OpenAIError(503, f"The server is overloaded: {pending} sequences in flight and this request adds "
                                   f"{num} (limit {limit}). Retry later.", code="queue_full")

    def sampling_params(self, req: Any, *, max_tokens: Optional[int], logprobs: Optional[int],
                         extra: Optional[dict[str, Any]] = None) -> SamplingParams:
        logit_bias = token_bias(req.logit_bias)
        if req.n > MAX_N:
            raise OpenAIError(400, f"n must be at most {MAX_N}, got {req.n}", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if req.stream_options is not None and not req.stream:
            raise OpenAIError(400, "stream_options can only be given when stream is true", param="stream_options")
        kw: dict[str, Any] = self.with_model_defaults(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty)
        kw.update(
            n=req.n,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            thinking_token_budget=req.thinking_token_budget,
            logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs,
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=logit_bias,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
        )
        kw.update(constraint_kwargs(req))
        kw.update(extra or {})
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            msg, param = str(e), param_of(str(e))
            if param in _CONSTRAINT_KEYS:  # SamplingParams' name: the request's field that gave the constraint
                param = constraint_param(req, COMPILE_FAILED) or param
            raise OpenAIError(400, msg, param=param) from None

    def with_model_defaults(self, **given: Any) -> dict[str, Any]:
        """Sampling fields as a request gives them (None: left unset) over the model's generation_config.json
        defaults (engine/generation_defaults.py); fields neither sets keep SamplingParams' own defaults."""
        return {**self.engine.generation_defaults.sampling, **{name: value for name, value in given.items() if value is not None}}

    def truncate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """truncate_prompt_tokens applied (as the engine applies it), before validate counts the prompt."""
        return truncate_prompt(prompt_ids, params, self.engine.max_model_len)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams, what: str,
                 fit_to_context: bool = False, max_tokens_field: str = "max_tokens") -> SamplingParams:
        """Checks the prompt and max_tokens against the context (400s naming them: `what` the prompt's field,
        `max_tokens_field` the one that gave max_tokens). `fit_to_context` (Anthropic's Messages API, whose
        newer models stop at the context window instead of refusing a max_tokens past it) lowers a max_tokens
        the context cannot hold to the room it has."""
        n, limit = len(prompt_ids), self.engine.max_model_len
        if params.max_tokens is None and n < limit:
            params = clone_params(params, max_tokens=self.engine.default_max_tokens(n))  # as every entry point
        if n >= limit:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                                   f"resulted in {n} tokens. Please reduce the length of the {what}.",
                              param=what, code="context_length_exceeded")
        if fit_to_context and params.max_tokens is not None:
            room = self.engine.output_room(n)  # the context's, and the KV cache's for one sequence
            if params.max_tokens > room > 0:
                params = clone_params(params, max_tokens=room)
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                   f"{n + params.max_tokens} tokens ({n} in the {what}, {params.max_tokens} in the "
                                   f"completion). Please reduce the length of the {what} or completion.",
                              param=max_tokens_field, code="context_length_exceeded")
        try:
            return self.engine.validate(prompt_ids, params)  # reads only immutable engine state
        except FieldError as e:  # a reply the KV cache cannot hold (max_tokens), else the prompt
            raise OpenAIError(400, str(e), param=max_tokens_field if e.field == "max_tokens" else what,
                              code=e.code) from None
        except ValueError as e:  # a sampling field checked against the vocabulary, else the prompt
            raise OpenAIError(400, str(e), param=param_of(str(e)) or what) from None

    def check_edge(self, req: Any) -> None:
        """Limits and string validity that hold for both endpoints, before any work that grows with
        the request's size: every string valid UTF-8, stop strings, bad words, JSON schemas; vLLM's fields of
        features agentserve lacks refused by name."""
        check_vllm_unsupported(req, self.engine.config.scheduler.policy, self.engine.config.grammar_backend)
        for field in ("allowed_token_ids", "stop_token_ids"):
            L.check_token_id_count(len(getattr(req, field) or ()), self.engine.arch.vocab_size, field)
        L.check_utf8(req.model_dump(exclude_none=True, by_alias=True), "")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        L.check_stop(stop, self.limits)
        L.check_bad_words(req.bad_words, self.limits)
        for field, value in constraint_documents(req):
            L.check_schema(value, field, self.limits)

    def need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer: send prompts as token id lists", param="prompt")
        return self.tokenizer

    # --- running ------------------------------------------------------------------------------------
    async def outputs(self, request_id: str, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       raw_request: Any, engine_kwargs: dict[str, Any],
                       req: Union[ChatCompletionRequest, CompletionRequest]
                       ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
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

        pumps = [asyncio.create_task(pump(i, engine_request_id(request_id, i, len(prompts)), ids))
                 for i, ids in enumerate(prompts)]

        async def watch() -> None:
            await wait_disconnect(raw_request)
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
                    raise self.engine_error(item)
                if item.error:
                    raise request_failure(item.error, item.error_kind, req, param_of(item.error))
                yield i, item
        finally:
            if watcher is not None:
                watcher.cancel()
            for t in pumps:
                t.cancel()

    @staticmethod
    async def primed(it: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """Waits for the first output before a stream's headers go out, so that what fails before
        generation starts (queue full, a constraint that does not compile, ...) still gets its HTTP
        status; returns an iterator that replays it. The first chunk of a stream carries the first
        token anyway, so this costs no latency."""
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await it.aclose()
            raise

        async def replay() -> AsyncGenerator[Any, None]:
            try:
                if first is not None:
                    yield first
                    async for item in it:
                        yield item
            finally:
                await it.aclose()

        return replay()

    @staticmethod
    def engine_error(e: BaseException) -> BaseException:
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, QueueFullError):
            return OpenAIError(503, f"The server is overloaded: {e}. Retry later.", code="queue_full")
        if isinstance(e, EngineDeadError):
            return OpenAIError(503, str(e), code="engine_unavailable")
        if isinstance(e, FieldError):
            return OpenAIError(400, str(e), param=e.field, code=e.code)
        if isinstance(e, AdapterNotFoundError):  # unloaded after the request's model was checked
            return OpenAIError(404, str(e), param="model", code="model_not_found")
        if isinstance(e, (InvalidRequestError, ValueError)):
            msg = str(e)
            return OpenAIError(400, msg, param=param_of(msg))
        logger.error("request failed: %r", e)
        return OpenAIError(500, f"internal error: {e}")

    def engine_kwargs(self, req: Any, lora_name: Optional[str]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if lora_name is not None:
            kw["lora_name"] = lora_name
        if req.cache_salt is not None:
            kw["cache_salt"] = checked_cache_salt(req.cache_salt)
        if req.priority:
            kw["priority"] = req.priority
        return kw


__all__ = ["OpenAIServing", "ClientDisconnected"]
