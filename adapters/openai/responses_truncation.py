"""`truncation: "auto"` on the Responses API (OpenAI's rule): when the conversation does not fit the context
window, items are dropped from its beginning until it does. Agent loops that run long send it so that the
loop goes on with its recent turns instead of failing with context_length_exceeded.

Dropped here in whole turns: from the front, everything up to the next user message, while the system message
(the instructions) stays; inside one long turn (an agent loop: one task, then many rounds of tool calls and
results), whole rounds from the turn's oldest, the task's user message kept. An assistant's tool calls never
lose their results, nor results their calls.
The conversation is rendered through the chat template and counted as a session turn would count it; the
fewest turns that make it fit are dropped (a binary search over where the kept part starts). It must leave
room for the reply: `max_output_tokens` when the request sets it, else `DEFAULT_REPLY_ROOM` tokens (at most
an eighth of the context). When the newest turn alone does not fit, nothing is dropped: the request fails as
it would have, naming the length.

A truncated conversation cannot continue on the resident session that holds the whole one: it starts a
session of its own (the prefix cache still serves its shared part). The count costs a render of the whole
conversation in a render-pool worker on each request that asks for "auto" (off the step loop; a turn that
fits then runs on its session as any other).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from agentserve.chat.limits import EdgeLimitError
from agentserve.chat.messages import SESSION_RULES, normalize_messages
from agentserve.chat.render_pool import RenderPool
from agentserve.chat.tools import normalize_tools

Message = dict[str, Any]
DEFAULT_REPLY_ROOM = 1024


def reply_room(max_output_tokens: Optional[int], max_model_len: int) -> int:
    return max_output_tokens if max_output_tokens is not None else min(DEFAULT_REPLY_ROOM, max_model_len // 8)


def leading_system_count(messages: Sequence[Message]) -> int:
    """How many messages at the front are system (or developer) messages: the instructions."""
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    return head


def _cut_points(messages: Sequence[Message]) -> tuple[int, list[int]]:
    """(the system messages' count, where a kept part may start: after them, at a user message, or at an
    assistant message that calls tools: a round of the loop, its results after it)."""
    head = leading_system_count(messages)
    starts = [i for i in range(head, len(messages)) if messages[i].get("role") == "user"
              or (messages[i].get("role") == "assistant" and messages[i].get("tool_calls"))]
    return head, sorted({head, *starts})


def _kept(messages: Sequence[Message], head: int, start: int) -> list[Message]:
    """The system messages, then the conversation from `start`; a start inside a turn keeps the turn's user
    message (the task the rounds after it work on)."""
    task = [] if messages[start].get("role") == "user" else \
        [m for m in messages[head:start] if m.get("role") == "user"][-1:]
    return list(messages[:head]) + task + list(messages[start:])


def rendered_text(pool: RenderPool, tokenizer: Any, messages: Sequence[Message],
                  normalized_tools: Optional[list[dict[str, Any]]], vocab_size: int,
                  template_kwargs: dict[str, Any]) -> str:
    """The conversation's prompt as a session turn renders it (with the assistant's generation prompt);
    runs in a render-pool worker (`tokenizer` is that worker's)."""
    normalized = normalize_messages(list(messages), SESSION_RULES, raw_tokens=False, vocab_size=vocab_size)
    return pool.render(tokenizer, normalized, normalized_tools, add_generation_prompt=True,
                       template_kwargs=template_kwargs)


def prompts_alike(pool: RenderPool, tokenizer: Any, held: Sequence[Message], held_text: str, held_ids: Sequence[int],
                  whole: Sequence[Message], new: Sequence[Message], normalized_tools: Optional[list[dict[str, Any]]],
                  vocab_size: int, template_kwargs: dict[str, Any]) -> bool:
    """Whether a turn on the session holding `held` (its text and tokens) with the `new` messages prompts the model
    with exactly the tokens of `whole` rendered and tokenized from scratch (a stateless re-send). The texts can
    agree while the tokens do not: the session holds the model's own tokens, and a reply it sampled may not be how
    the tokenizer splits that text (SmolLM2: " don|key" for " donkey", a reply cut after "\n\n" held as two
    newlines). Runs in a render-pool worker, mirroring chat/render.prepare_turn's append."""
    in_place = rendered_text(pool, tokenizer, list(held) + list(new), normalized_tools, vocab_size, template_kwargs)
    text = rendered_text(pool, tokenizer, whole, normalized_tools, vocab_size, template_kwargs)
    if in_place != text:
        return False
    if not text.startswith(held_text):
        return True  # the turn re-tokenizes the whole rendering (prepare_turn), as a stateless request does
    stateless = pool.encode(tokenizer, text, "input", add_special_tokens=False)
    appended = list(held_ids) + pool.encode(tokenizer, text[len(held_text):], "input", add_special_tokens=False)
    return stateless == appended


def rendered_length(pool: RenderPool, tokenizer: Any, messages: Sequence[Message],
                    normalized_tools: Optional[list[dict[str, Any]]], vocab_size: int,
                    template_kwargs: dict[str, Any]) -> int:
    """rendered_text's tokens."""
    text = rendered_text(pool, tokenizer, messages, normalized_tools, vocab_size, template_kwargs)
    return len(pool.encode(tokenizer, text, "input", add_special_tokens=False))


async def fit_conversation(pool: RenderPool, messages: Sequence[Message], tools: Optional[list[dict[str, Any]]],
                           budget: int, vocab_size: int, template_kwargs: dict[str, Any]) -> Optional[list[Message]]:
    """The conversation with the fewest oldest turns dropped that renders to at most `budget` tokens; None when
    it fits whole (nothing to drop) or when even its newest turn alone does not fit."""
    head, cuts = _cut_points(messages)
    tools_n = normalize_tools(tools)

    def kept(j: int) -> list[Message]:
        return _kept(messages, head, cuts[j]) if cuts[j] < len(messages) else list(messages)

    def count(tokenizer: Any, msgs: list[Message]) -> float:
        try:
            return rendered_length(pool, tokenizer, msgs, tools_n, vocab_size, template_kwargs)
        except EdgeLimitError as e:
            if e.code == "context_length_exceeded":  # longer than the context can hold at all
                return float("inf")
            raise

    async def fits(j: int) -> bool:
        msgs = kept(j)
        return await pool.run(lambda tok: count(tok, msgs)) <= budget

    if await fits(0) or not await fits(len(cuts) - 1):
        return None
    lo, hi = 0, len(cuts) - 1  # fits(lo) is false, fits(hi) true: the first that fits lies in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await fits(mid):
            hi = mid
        else:
            lo = mid
    return kept(hi)
