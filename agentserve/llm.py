"""Offline API: LLM(model=PATH, ...).generate(prompts, params) and .chat(messages, params)."""

from __future__ import annotations

import itertools
import time
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

from agentserve.chat.limits import check_sampling
from agentserve.chat.messages import OPENAI_RULES, normalize_messages, template_messages
from agentserve.config import EngineConfig
from agentserve.engine.engine import Engine, Prompt
from agentserve.engine.validation import check_priority, truncate_prompt
from agentserve.errors import LoRANotEnabledError
from agentserve.lora.request import LoRARequest
from agentserve.outputs import RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.vllm_flags import engine_kwargs_from_vllm_llm_kwargs

Message = dict[str, Any]
# adapter= of generate / chat: one LoRA adapter name for every prompt, or one (name or None) per prompt.
AdapterArg = Union[None, str, Sequence[Optional[str]]]
# lora_request= (vLLM's form): one LoRARequest for every prompt, or one (or None) per prompt.
LoRARequestArg = Union[None, LoRARequest, Sequence[Optional[LoRARequest]]]


# vLLM's prompt dicts (TextPrompt / TokensPrompt): {"prompt": text} or {"prompt_token_ids": ids}, with an
# optional "cache_salt" (the prefix-cache namespace the request's pages are keyed in).
_PROMPT_KEYS = {"prompt", "prompt_token_ids"}
_OPTIONAL_PROMPT_KEYS = {"cache_salt"}


def _prompt_from_dict(prompt: dict[str, Any]) -> tuple[Prompt, Optional[str]]:
    """The prompt and its cache_salt (None when the dict gives none)."""
    unknown = sorted(set(prompt) - _PROMPT_KEYS - _OPTIONAL_PROMPT_KEYS)
    given = set(prompt) & _PROMPT_KEYS
    if unknown or len(given) != 1:
        what = f"{', '.join(map(repr, unknown))} not supported" if unknown else "give exactly one of them"
        raise ValueError(f"a prompt dict takes 'prompt' (text) or 'prompt_token_ids' (token ids), and optionally "
                         f"'cache_salt': {what}")
    salt = prompt.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ValueError(f"a prompt dict's 'cache_salt' must be a non-empty string, got {salt!r}")
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise ValueError("a prompt dict's 'prompt' must be text")
        return prompt["prompt"], salt
    ids = prompt["prompt_token_ids"]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError("a prompt dict's 'prompt_token_ids' must be a list of token ids")
    return list(ids), salt


def _prompt_list(prompts: Union[Prompt, dict[str, Any], Sequence[Union[Prompt, dict[str, Any]]]]
                 ) -> list[tuple[Prompt, Optional[str]]]:
    """One prompt (text, token ids or a vLLM prompt dict) or a list of them, as (text / id list, cache_salt)."""
    items: Sequence[Union[Prompt, dict[str, Any]]]
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        items = [cast(Union[Prompt, dict[str, Any]], prompts)]  # one prompt: text, a prompt dict or token ids
    else:
        items = cast(Sequence[Union[Prompt, dict[str, Any]]], prompts)
    return [_prompt_from_dict(p) if isinstance(p, dict) else (p, None) for p in items]


def _adapters_per_prompt(adapter: AdapterArg, num_prompts: int) -> list[Optional[str]]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * num_prompts
    names = list(adapter)
    if len(names) != num_prompts:
        raise ValueError(f"{num_prompts} prompts but {len(names)} adapters (give one name, or one name or None "
                         "per prompt)")
    return names


class LLM:
    def __init__(self, model: str, device: Optional[str] = None, dtype: str = "auto", **engine_config: Any) -> None:
        engine_config = engine_kwargs_from_vllm_llm_kwargs(engine_config, model)  # trust_remote_code, swap_space, ...
        self._own(Engine.from_kwargs(model, device=device, dtype=dtype, **engine_config))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm._own(Engine(config))
        return llm

    def _own(self, engine: Engine) -> None:
        self.engine = engine
        self.engine.emit_unfinished = False  # generate() returns finished outputs only
        self._ids = itertools.count()
        # Deleting the LLM closes its engine at once: the engine's own reference cycles would keep its
        # device memory until a garbage collection, and benchmarks build the next engine right after
        # `del llm`. Not at interpreter exit, where the process's shutdown releases everything.
        self._closer = weakref.finalize(self, engine.close)
        self._closer.atexit = False

    def close(self) -> None:
        """Releases the engine's device memory, swap space and grammar workers (idempotent); `with
        LLM(...) as llm:` does it on leaving the block, and deleting the LLM does it too."""
        self._closer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        """vLLM's accessor of the same tokenizer (scripts render prompts with its chat template)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the model's generation_config.json sampling defaults (engine/generation_defaults.py),
        used when generate or chat get no sampling parameters; its max_new_tokens is their max_tokens."""
        defaults = self.engine.generation_defaults
        if defaults.max_tokens is None:
            return SamplingParams(**defaults.sampling)
        return SamplingParams(**defaults.sampling, max_tokens=defaults.max_tokens)

    def _params_per_prompt(self, sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]], count: int,
                           what: str) -> list[SamplingParams]:
        """One SamplingParams per prompt (or conversation): the one given (or the defaults) for all, or the
        list given, which must have one per prompt."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params or self.get_default_sampling_params()] * count
        params_list = list(sampling_params)
        if len(params_list) != count:
            raise ValueError(f"{count} {what} but {len(params_list)} sampling params")
        return params_list

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's: forgets the prefix cache, so the next prompts prefill in full (a cold start for a
        benchmark); True when done. No request runs between generate and chat calls here, so vLLM's
        `reset_running_requests` (for requests caught mid-run) has nothing to act on."""
        return self.engine.reset_prefix_cache()

    def load_adapter(self, name: str, path: str) -> None:
        """Loads (or reloads, with new weights and a fresh cache key) the PEFT LoRA directory at `path`
        as `name`. Needs enable_lora=True. Raises LoRAAdapterError naming what is wrong with it."""
        self.engine.lora.load(name, str(path))

    def unload_adapter(self, name: str, drain: bool = False) -> None:
        """Forgets adapter `name` (AdapterNotFoundError if it is not loaded; AdapterInUseError while
        requests use it, unless `drain`)."""
        self.engine.lora.unload(name, drain=drain)

    def list_adapters(self) -> list[str]:
        return self.engine.lora_manager.names() if self.engine.lora_manager is not None else []

    def _adapter_names(self, lora_request: LoRARequestArg) -> AdapterArg:
        """adapter= names for vLLM's lora_request=, loading each adapter on its first use. A name already
        loaded from another directory is an error (reload it with load_adapter to change its weights)."""
        single = lora_request is None or isinstance(lora_request, LoRARequest)
        requests: list[Optional[LoRARequest]] = [lora_request] if single else list(lora_request)  # type: ignore[list-item, arg-type]
        for req in {r for r in requests if r is not None}:
            if self.engine.lora_manager is None:
                raise LoRANotEnabledError("lora_request= needs an engine started with enable_lora=True")
            loaded = self.engine.lora_manager.path_of(req.lora_name)
            if loaded is None:
                self.load_adapter(req.lora_name, req.lora_path)
            elif loaded.resolve() != Path(req.lora_path).resolve():
                raise ValueError(f"LoRARequest {req.lora_name!r}: that name is loaded from {str(loaded)!r}, not "
                                 f"{req.lora_path!r}; use another lora_name, or load_adapter() to replace it")
        names = [r.lora_name if r is not None else None for r in requests]
        return names[0] if single else names

    def generate(self, prompts: Union[Prompt, dict[str, Any], Sequence[Union[Prompt, dict[str, Any]]]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = False, adapter: AdapterArg = None,
                 lora_request: LoRARequestArg = None, priority: Optional[Sequence[int]] = None) -> list[RequestOutput]:
        """Prompts are strings, token-id lists or vLLM's prompt dicts ({"prompt": text} or
        {"prompt_token_ids": ids}, optionally with "cache_salt"), one prompt or a list. Outputs come in input order.
        `adapter`: a loaded LoRA adapter's name for all prompts, or a name (or None: the base model)
        per prompt. `lora_request`: vLLM's form of the same (agentserve.lora.request.LoRARequest, loaded
        on first use); give one of the two. `priority`: vLLM's, one per prompt (lower runs first) under
        policy="priority"."""
        if lora_request is not None:
            if adapter is not None:
                raise ValueError("give adapter= or lora_request=, not both")
            adapter = self._adapter_names(lora_request)
        salted = _prompt_list(prompts)
        prompts = [prompt for prompt, _ in salted]
        params_list = self._params_per_prompt(sampling_params, len(prompts), "prompts")
        for params in params_list:  # the server's per-request limits hold offline too
            check_sampling(params, self.engine.config.server)
        for params in {id(p): p for p in params_list if p.has_constraint}.values():
            self.engine.check_constraint(params)  # vLLM refuses a constraint that does not compile up front
        adapters = _adapters_per_prompt(adapter, len(prompts))
        priorities = self._priorities(priority, len(prompts))
        if self.engine.lora_manager is None and any(name is not None for name in adapters):  # "" too
            raise LoRANotEnabledError("adapter= needs an engine started with enable_lora=True")
        ids = []
        try:
            for (prompt, salt), params, lora_name, rank in zip(salted, params_list, adapters, priorities):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt, self._fit_to_context(prompt, params), lora_name=lora_name,
                                        priority=rank, cache_salt=salt)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:  # nothing may leak pages, whatever went wrong
                self.engine.abort(rid)
            raise

    def _fit_to_context(self, prompt: Prompt, params: SamplingParams) -> SamplingParams:
        """vLLM's offline LLM stops a reply at max_model_len (finish_reason "length") rather than refusing a
        max_tokens the context cannot hold, as the servers' endpoints do; a prompt that leaves no room is still
        refused by the engine. A min_tokens past the room ends there too (vLLM checks it against max_tokens only).
        max_tokens=None given offline is the whole room, as vLLM's processor reads it (the servers' default, for
        a request that sets none, is capped by generation_config's max_new_tokens)."""
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        room = self.engine.output_room(len(truncate_prompt(ids, params, self.engine.max_model_len)))
        if room <= 0:
            return params
        fitted = {k: room for k, v in (("max_tokens", params.max_tokens), ("min_tokens", params.min_tokens))
                  if v is None or v > room}
        return params.clone(**fitted) if fitted else params

    def _priorities(self, priority: Optional[Sequence[int]], count: int) -> list[int]:
        if priority is None:
            return [0] * count
        if len(priority) != count:
            raise ValueError(f"priority has {len(priority)} values for {count} prompts: give one per prompt")
        for p in priority:  # every prompt's before the first is queued
            check_priority(int(p), self.engine.config.scheduler.policy)
        return [int(p) for p in priority]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating")
        start = time.perf_counter()
        generated = 0
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    generated += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}")
        if bar is not None:
            bar.close()
        return [done[rid] for rid in ids]

    def render_chat(self, messages: Sequence[Message], tools: Optional[list[dict[str, Any]]] = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        return self._rendered_chat(messages, tools, add_generation_prompt, **template_kwargs)[1]

    def _rendered_chat(self, messages: Sequence[Message], tools: Optional[list[dict[str, Any]]],
                       add_generation_prompt: bool, **template_kwargs: Any) -> tuple[str, list[int]]:
        """The chat template's text for a conversation, and its token ids (the template writes the special
        tokens itself, so none are added). The messages are OpenAI's shapes, put in the form templates
        take as the HTTP API puts them (a call's JSON-string arguments as the object, content parts as
        text): templates write arguments with `tojson`, which would write a string again as JSON."""
        tok = self.engine.tokenizer
        if tok is None or not tok.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        msgs = template_messages(normalize_messages(messages, OPENAI_RULES), tok)
        text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                       tokenize=False, **template_kwargs)
        return text, list(tok.encode(text, add_special_tokens=False))

    def chat(self, messages: Union[Sequence[Message], Sequence[Sequence[Message]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             tools: Optional[list[dict[str, Any]]] = None,
             tool_choice: Union[None, str, dict[str, Any]] = None, use_tqdm: bool = False,
             adapter: AdapterArg = None, lora_request: LoRARequestArg = None,
             chat_template_kwargs: Optional[dict[str, Any]] = None, chat_template_content_format: str = "auto",
             mm_processor_kwargs: Optional[dict[str, Any]] = None, **template_kwargs: Any) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations, through the chat template;
        one SamplingParams for all or one per conversation. `chat_template_kwargs` (vLLM's: e.g.
        {"enable_thinking": False}) are template variables merged over the other keywords.
        vLLM's chat_template_content_format and mm_processor_kwargs are keywords of chat, not template
        variables: content parts reach templates as text (vLLM's "string"), and there are no multimodal inputs."""
        if chat_template_content_format not in ("auto", "string"):
            raise ValueError(f"chat_template_content_format {chat_template_content_format!r} is not supported: "
                             "content parts reach the chat template as one text ('string'); use 'auto' or 'string'")
        if mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs is not supported: agentserve serves text-only models")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if tools is None and tool_choice not in (None, "none"):  # vLLM: "When using tool_choice, tools must be set"
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        params_list = self._params_per_prompt(sampling_params, len(conversations), "conversations")
        if tools is not None:
            params_list = [p.clone(tools=tools, tool_choice=tool_choice or "auto") for p in params_list]
        template_kwargs.update(chat_template_kwargs or {})
        add_generation_prompt = bool(template_kwargs.pop("add_generation_prompt", True))
        # As vLLM's chat: template variables named like the template's own arguments override them (tools: what
        # the template shows; the reply's calls are still parsed against `tools`).
        shown_tools = template_kwargs.pop("tools", tools)
        rendered = [self._rendered_chat(conv, shown_tools, add_generation_prompt, **template_kwargs)  # type: ignore[arg-type]
                    for conv in conversations]
        outputs = self.generate([ids for _, ids in rendered], params_list, use_tqdm=use_tqdm, adapter=adapter,
                                lora_request=lora_request)
        for out, (text, _) in zip(outputs, rendered):
            out.prompt = text  # as vLLM's chat: the rendered conversation
        return outputs
