"""Conversations (OpenAI's Conversations API): a durable list of items that responses created with
`conversation` read as their history and append their input and output to.

A conversation is its items, kept here, plus the resident session (sessions/store.py) its last
response ran on, with how many of its items that session holds. The next response on the conversation
continues on that session and prefills only what came after: items added since through
`POST /v1/conversations/{id}/items`, and its own input. When the session cannot be continued (it
expired with its TTL, an item it holds was deleted, the response renders with other instructions,
tools, adapter weights or template variables, or it is the conversation's first response), the response
renders the whole conversation on a new session, and the prefix cache still finds the shared pages.
So a conversation outlives its session: the items are the record, the session is their KV.

One response runs on a conversation at a time (a second gets 409, which OpenAI's clients retry); items
cannot be added or deleted while it runs. A conversation belongs to the tenant that created it; another
tenant's id is NOT_FOUND. Touched only on the event loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from agentserve.adapters.openai import responses_items as I
from agentserve.adapters.openai.protocol import OpenAIError

Item = dict[str, Any]
MAX_ITEMS_PER_REQUEST = 20  # OpenAI's bound on the items one create or items-create request adds
MAX_ITEMS_PER_CONVERSATION = 10_000  # each response turns every item into a message: a bound on that work


@dataclass(eq=False)
class Conversation:
    conversation_id: str
    tenant: str
    created_at: int
    metadata: dict[str, str]
    items: list[Item] = field(default_factory=list)
    # The session holding the rendered conversation up to items[:session_items], after `session_turn`
    # turns, rendered under `render_key` (instructions, tools, adapter, template variables).
    session_id: Optional[str] = None
    session_items: int = 0
    session_turn: int = 0
    render_key: Optional[str] = None
    busy: bool = False  # a response is running on it

    def body(self) -> dict[str, Any]:
        return {"id": self.conversation_id, "object": "conversation", "created_at": self.created_at,
                "metadata": dict(self.metadata)}

    def index_of(self, item_id: str) -> int:
        for i, item in enumerate(self.items):
            if item["id"] == item_id:
                return i
        raise OpenAIError(404, f"Item with id {item_id!r} not found in conversation {self.conversation_id!r}.",
                          param="item_id", code="item_not_found")

    def check_idle(self) -> None:
        if self.busy:
            raise OpenAIError(409, f"Another response is running on conversation {self.conversation_id!r}; retry "
                                   "when it has finished.", param="conversation", code="conversation_locked")

    def detach_session(self) -> Optional[str]:
        """Forgets the session (its KV no longer matches the items); returns its id for the caller to release."""
        session_id, self.session_id, self.session_items, self.render_key = self.session_id, None, 0, None
        return session_id


class ConversationStore:
    """Conversations by id. A tenant keeps at most `max_per_tenant` of them (429 past it), whose items take
    at most `max_bytes_per_tenant` bytes of JSON together (429 past it: the items live in host memory)."""

    def __init__(self, max_per_tenant: int, max_bytes_per_tenant: int) -> None:
        self.max_per_tenant, self.max_bytes_per_tenant = max_per_tenant, max_bytes_per_tenant
        self._by_id: dict[str, Conversation] = {}
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}  # tenant -> its conversations' item bytes

    def __len__(self) -> int:
        return len(self._by_id)

    def holds_session(self, session_id: str) -> bool:
        return any(c.session_id == session_id for c in self._by_id.values())

    def get(self, conversation_id: str, tenant: str, param: str = "conversation_id") -> Conversation:
        c = self._by_id.get(conversation_id)
        if c is None or c.tenant != tenant:
            raise OpenAIError(404, f"Conversation with id {conversation_id!r} not found.", param=param,
                              code="conversation_not_found")
        return c

    def create(self, tenant: str, metadata: dict[str, str], items: list[Item]) -> Conversation:
        if self._count.get(tenant, 0) >= self.max_per_tenant:
            raise OpenAIError(429, f"this tenant keeps {self.max_per_tenant} conversations, the limit "
                                   "(--max-sessions-per-tenant): delete one first", code="too_many_conversations")
        c = Conversation(I.new_id("conv"), tenant, int(time.time()), dict(metadata))
        self.check_room(c, items, "items")
        self._by_id[c.conversation_id] = c
        self._count[tenant] = self._count.get(tenant, 0) + 1
        self.append(c, items)
        return c

    def remove(self, c: Conversation) -> None:
        c.check_idle()
        del self._by_id[c.conversation_id]
        _decrement(self._count, c.tenant, 1)
        _decrement(self._bytes, c.tenant, sum(_size(item) for item in c.items))

    def check_room(self, c: Conversation, items: list[Item], field_name: str) -> None:
        """400 for items the conversation cannot take (past its item bound, or with an id it holds already),
        429 when they would take the tenant past its bytes."""
        if len(c.items) + len(items) > MAX_ITEMS_PER_CONVERSATION:
            raise OpenAIError(400, f"conversation {c.conversation_id!r} would hold more than "
                                   f"{MAX_ITEMS_PER_CONVERSATION} items: start a new conversation", param=field_name)
        held = {item["id"] for item in c.items}
        for i, item in enumerate(items):
            if item["id"] in held:
                raise OpenAIError(400, f"{field_name}[{i}].id {item['id']!r} is already an item of this conversation",
                                  param=f"{field_name}[{i}].id")
            held.add(item["id"])
        size = self._bytes.get(c.tenant, 0) + sum(_size(item) for item in items)
        if size > self.max_bytes_per_tenant:
            raise OpenAIError(429, f"this tenant's conversation items would take {size} bytes; the limit is "
                                   f"{self.max_bytes_per_tenant} (--max-conversation-bytes-per-tenant): delete "
                                   "conversations or items first", code="conversation_bytes_exceeded")

    def append(self, c: Conversation, items: list[Item]) -> None:
        """Adds items already checked by check_room (a response's output is added without a check: it is
        bounded by the context)."""
        c.items.extend(items)
        if c.conversation_id in self._by_id:
            self._bytes[c.tenant] = self._bytes.get(c.tenant, 0) + sum(_size(item) for item in items)

    def delete_item(self, c: Conversation, index: int) -> None:
        _decrement(self._bytes, c.tenant, _size(c.items.pop(index)))


def _size(item: Item) -> int:
    return len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode())


def _decrement(counts: dict[str, int], key: str, by: int) -> None:
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def checked_item_list(items: Any, field_name: str) -> list[Any]:
    """A request's list of items to add (each checked later, as a response's input would be: normalize_input,
    input_messages)."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise OpenAIError(400, f"{field_name} must be a list of items", param=field_name)
    if len(items) > MAX_ITEMS_PER_REQUEST:
        raise OpenAIError(400, f"{field_name} has {len(items)} items; at most {MAX_ITEMS_PER_REQUEST} can be added "
                               "at a time", param=field_name)
    return items


def listed_item(item: Item) -> Item:
    """An item as the conversation keeps and lists it (OpenAI's ConversationItem shapes)."""
    item = dict(item)
    item.setdefault("status", "completed")
    if item.get("type") == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        item["content"] = [{"type": part, "text": item["content"], **({"annotations": []} if part == "output_text"
                                                                       else {})}]
    return item
