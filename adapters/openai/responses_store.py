"""Stored responses: what `previous_response_id`, retrieve, delete and input_items need.

A stored response is not a copy of the conversation in a side store: it points at the session
(sessions/store.py) whose pages hold the conversation up to its reply, and at the turn it ended. It
lives as long as that session does: once the session expires (its TTL) or is closed, the response
is gone (404), exactly like an unknown id. A response belongs to the tenant that created it; another
tenant's id is NOT_FOUND.

Each response also keeps its own new messages and its reply, linked to its predecessor: when a
response is continued twice (a branch, a retry), or with other instructions, tools or adapter
weights (another adapter, or its name loaded again) than its session was rendered with, the
continuation starts a new session from that conversation (the prefix cache still finds the shared
pages, those of the same adapter weights) instead of the resident one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from agentserve.adapters.openai.protocol import OpenAIError

Message = dict[str, Any]
_SWEEP_INTERVAL_S = 10.0


@dataclass(eq=False)
class StoredResponse:
    response_id: str
    tenant: str
    session_id: str
    turn: int                       # the session's turn count right after this response
    render_key: str                 # instructions, tools and adapter key the session was rendered with
    parent: Optional["StoredResponse"]
    new_messages: list[Message]     # this request's input, as chat messages
    reply: Message                  # the assistant's reply (content, tool_calls)
    body: dict[str, Any]            # the response object
    input_items: list[dict[str, Any]] = field(default_factory=list)
    continued: bool = False         # a continuation took the session's tip (in place)

    def conversation(self) -> list[Message]:
        """Every message up to and including this reply (instructions excluded: OpenAI does not
        carry them over to a continuation)."""
        chain: list[StoredResponse] = []
        node: Optional[StoredResponse] = self
        while node is not None:
            chain.append(node)
            node = node.parent
        out: list[Message] = []
        for r in reversed(chain):
            out += r.new_messages + [r.reply]
        return out

    def call_names(self) -> dict[str, str]:
        """call_id -> function name of every call in the conversation (tool messages carry the name)."""
        names: dict[str, str] = {}
        for m in self.conversation():
            for call in m.get("tool_calls") or []:
                names[call["id"]] = call["function"]["name"]
        return names


class ResponsesStore:
    """Stored responses by id, each tied to the session behind it. Touched only on the event loop."""

    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions   # the SessionStore
        self._by_id: dict[str, StoredResponse] = {}
        self._refs: dict[str, int] = {}  # session id -> stored responses on it
        # (tenant, item id) -> the stored responses holding it (as input or output; oldest first), for input items
        # of type item_reference. Several hold one id when a client sends an earlier output back as input; one
        # map keyed by the id alone let a later holder's delete, or another tenant's item of the same id, lose it.
        self._item_holders: dict[tuple[str, str], list[StoredResponse]] = {}
        self._last_sweep = time.monotonic()

    def __len__(self) -> int:
        return len(self._by_id)

    def _alive(self, r: StoredResponse) -> bool:
        # A dict membership test is atomic: safe beside the step thread that expires sessions.
        return r.session_id in self.sessions.sessions

    def get(self, response_id: str, tenant: str, param: str = "response_id") -> StoredResponse:
        r = self._by_id.get(response_id)
        if r is not None and not self._alive(r):
            self._forget(r)
            r = None
        if r is None or r.tenant != tenant:
            raise OpenAIError(404, f"Response with id '{response_id}' not found (unknown, deleted, not stored, or "
                                   "expired with its session).", param=param, code="response_not_found")
        return r

    def uses_session(self, session_id: str) -> bool:
        return session_id in self._refs

    def add(self, r: StoredResponse) -> None:
        self._sweep()
        self._by_id[r.response_id] = r
        self._refs[r.session_id] = self._refs.get(r.session_id, 0) + 1
        for item in _items_of(r):
            holders = self._item_holders.setdefault((r.tenant, item["id"]), [])
            if r not in holders:
                holders.append(r)

    def resolve_references(self, items: list[dict[str, Any]], tenant: str,
                           field_name: str = "input") -> list[dict[str, Any]]:
        """The input items with each `item_reference` replaced by the stored item it names (an earlier
        response's input or output item of the same tenant); 404 naming the reference when none is kept."""
        out = []
        for i, item in enumerate(items):
            if item.get("type") != "item_reference":
                out.append(item)
                continue
            item_id = item.get("id")
            holders = self._item_holders.get((tenant, item_id), []) if isinstance(item_id, str) else []
            owner = next((r for r in reversed(holders) if self._alive(r)), None)
            if owner is None:
                raise OpenAIError(404, f"Item with id {item_id!r} not found (unknown, or its response is deleted, "
                                       "not stored or expired with its session).", param=f"{field_name}[{i}].id",
                                  code="item_not_found")
            out.append(next(dict(kept) for kept in _items_of(owner) if kept["id"] == item_id))
        return out

    def remove(self, response_id: str, tenant: str) -> Optional[str]:
        """Deletes the response; returns its session's id when no stored response uses it any more
        (the caller closes that session)."""
        r = self.get(response_id, tenant)
        return self._forget(r)

    def _forget(self, r: StoredResponse) -> Optional[str]:
        self._by_id.pop(r.response_id, None)
        for item in _items_of(r):
            key = (r.tenant, item["id"])
            holders = [h for h in self._item_holders.get(key, []) if h is not r]
            if holders:
                self._item_holders[key] = holders
            else:
                self._item_holders.pop(key, None)
        left = self._refs.get(r.session_id, 1) - 1
        if left > 0:
            self._refs[r.session_id] = left
            return None
        self._refs.pop(r.session_id, None)
        return r.session_id

    def _sweep(self) -> None:
        """Drops responses whose sessions expired (at most every few seconds: it scans them all)."""
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        for r in [r for r in self._by_id.values() if not self._alive(r)]:
            self._forget(r)


def _items_of(r: StoredResponse) -> list[dict[str, Any]]:
    """A stored response's items that carry an id: its input items, then its output items."""
    return [item for item in [*r.input_items, *r.body.get("output", [])]
            if isinstance(item, dict) and isinstance(item.get("id"), str)]
