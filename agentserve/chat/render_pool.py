"""The render/tokenize worker pool: chat templates and tokenization off the engine's step thread and
off the event loop, for HTTP and gRPC alike.

Every text is first held to a cheap bound — its length in characters against `max_model_len` times a
generous number of characters per token — so that what cannot fit is refused before any work that
grows with its size. Several workers, each with its own copy of the tokenizer (a fast tokenizer is not
safe to share between threads: concurrent calls can fail with "Already borrowed"), so a small request
never waits behind a large one. The copies are made up front: a request never pays for one.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from transformers.utils.chat_template_utils import _compile_jinja_template

from agentserve.chat.limits import EdgeLimitError
from agentserve.chat.messages import template_messages
from agentserve.config import ServerConfig

T = TypeVar("T")


class _RenderBudget(threading.local):
    chars: Optional[int] = None  # this thread's bound on a client template's output; None: unbounded


_budget = _RenderBudget()


class _TemplateOutputTooLarge(Exception):
    pass


def _bounded_concat(parts: Iterable[str]) -> str:
    """Joins a template's output as Jinja produces it (lazily), and stops the rendering as soon as it
    passes this thread's budget: a few bytes of template can loop out megabytes."""
    limit = _budget.chars
    if limit is None:
        return "".join(parts)
    out: list[str] = []
    size = 0
    for part in parts:
        size += len(part)
        if size > limit:
            raise _TemplateOutputTooLarge()
        out.append(part)
    return "".join(out)


def _bound_template(template: str) -> None:
    """transformers compiles each template string into its own sandboxed Jinja environment (cached),
    and Template.render joins the output with `environment.concat`: bounding that join bounds the
    rendering's memory and (for templates that write as they loop) its time."""
    _compile_jinja_template(template).environment.concat = _bounded_concat


class RenderPool:
    def __init__(self, tokenizer: Any, max_model_len: int, limits: ServerConfig) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.limits = limits
        # Characters that certainly hold at least max_model_len tokens (no token spans more).
        self.max_chars = max_model_len * limits.prompt_bytes_per_token
        # One tokenizer per worker; a job takes one for its duration (never more jobs than copies).
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(limits.tokenizer_workers):
            self._tokenizers.put(copy.deepcopy(tokenizer))
        self._executor = ThreadPoolExecutor(max_workers=limits.tokenizer_workers,
                                            thread_name_prefix="agentserve-render")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _with_tokenizer(self, fn: Callable[[Any], T]) -> T:
        tok = self._tokenizers.get()
        try:
            return fn(tok)
        finally:
            self._tokenizers.put(tok)

    async def run(self, fn: Callable[[Any], T]) -> T:
        """fn(a tokenizer of its own) on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._with_tokenizer, fn)

    # --- bounds ---------------------------------------------------------------------------------------
    def check_chars(self, num_chars: int, field: str) -> None:
        """Refuses text that cannot fit in the context, before tokenizing it (context_length_exceeded)."""
        if num_chars > self.max_chars:
            raise EdgeLimitError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your {field} is "
                f"{num_chars} characters, more than {self.max_model_len} tokens can hold (at most "
                f"{self.limits.prompt_bytes_per_token} characters per token). Please reduce the length of the "
                f"{field}.", field, code="context_length_exceeded")

    def check_messages(self, messages: Sequence[dict[str, Any]], field: str = "messages") -> None:
        """The cheap bound on a conversation: each message's content (and reasoning), then their sum."""
        total = 0
        for i, m in enumerate(messages):
            for key in ("content", "reasoning_content"):
                text = m.get(key) if isinstance(m, dict) else None
                if isinstance(text, str):
                    self.check_chars(len(text), f"{field}[{i}].{key}")
                    total += len(text)
        self.check_chars(total, field)

    # --- work (worker threads) ------------------------------------------------------------------------
    def encode(self, tokenizer: Any, text: str, field: str, *, add_special_tokens: bool) -> list[int]:
        self.check_chars(len(text), field)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens)) if text else []

    def render(self, tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Optional[list[dict[str, Any]]],
               *, add_generation_prompt: bool, field: str = "messages", chat_template: Optional[str] = None,
               template_kwargs: Optional[dict[str, Any]] = None) -> str:
        """The conversation through the chat template; a rendering longer than the context can hold
        (a template that expands its input) is refused before it is tokenized. `template_kwargs`: the
        request's variables, one dict (as keyword arguments, `tokenizer` or `field` would bind to this
        method's own parameters)."""
        if chat_template is not None:  # a client's template: its output is bounded while it renders
            _bound_template(chat_template)
            _budget.chars = self.max_chars
        msgs = template_messages(messages, tokenizer, chat_template)
        try:
            text = tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False, chat_template=chat_template, **(template_kwargs or {}))
        except _TemplateOutputTooLarge:
            raise EdgeLimitError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, the chat template "
                f"rendered your {field} to more than {self.max_chars} characters. Please reduce the length of the "
                f"{field} or fix the template.", field, code="context_length_exceeded") from None
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, raise_exception(...) in templates, ...
            raise EdgeLimitError(f"the chat template rejected the {field}: {e}", field) from None
        finally:
            _budget.chars = None
        if not isinstance(text, str):
            raise EdgeLimitError(f"the chat template did not render the {field} to text", field)
        self.check_chars(len(text), field)  # the template may have expanded its input
        return text
