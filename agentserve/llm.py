"""Offline API: LLM(model=PATH, ...).generate(prompts, params) and .chat(messages, params)."""

from __future__ import annotations

import itertools
import time
from typing import Any, Optional, Sequence, Union

from agentserve.chat.limits import check_sampling
from agentserve.config import EngineConfig
from agentserve.engine.engine import Engine, Prompt
from agentserve.outputs import RequestOutput
from agentserve.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    def __init__(self, model: str, device: Optional[str] = None, dtype: str = "auto", **engine_config: Any) -> None:
        self.engine = Engine.from_kwargs(model, device=device, dtype=dtype, **engine_config)
        self.engine.emit_unfinished = False  # generate() returns finished outputs only
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = Engine(config)
        llm.engine.emit_unfinished = False
        llm._ids = itertools.count()
        return llm

    def close(self) -> None:
        """Releases the engine's device memory, swap space and grammar workers (idempotent); `with
        LLM(...) as llm:` does it on leaving the block."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Prompts are strings or token-id lists (one prompt or a list). Outputs come in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        for params in params_list:  # the server's per-request limits hold offline too
            check_sampling(params, self.engine.config.server)
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt, params)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:  # nothing may leak pages, whatever went wrong
                self.engine.abort(rid)
            raise

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
        tok = self.engine.tokenizer
        if tok is None or not tok.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        text = tok.apply_chat_template(list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                                       tokenize=False, **template_kwargs)
        return list(tok.encode(text, add_special_tokens=False))

    def chat(self, messages: Union[Sequence[Message], Sequence[Sequence[Message]]],
             sampling_params: Optional[SamplingParams] = None, tools: Optional[list[dict[str, Any]]] = None,
             tool_choice: Union[None, str, dict[str, Any]] = None, use_tqdm: bool = False,
             **template_kwargs: Any) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations, through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = sampling_params or SamplingParams()
        if tools is not None:
            params = params.clone(tools=tools, tool_choice=tool_choice or "auto")
        prompts = [self.render_chat(conv, tools=tools, **template_kwargs) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm=use_tqdm)
