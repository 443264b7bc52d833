"""The Conversations API (OpenAI's shapes): POST /v1/conversations (create, with up to 20 items),
GET / POST (update its metadata) / DELETE /v1/conversations/{id}, GET /v1/conversations/{id}/items
(a page, newest first by default), POST /v1/conversations/{id}/items (append up to 20), GET / DELETE
/v1/conversations/{id}/items/{item_id}. Responses join a conversation with `conversation` (responses.py);
what a conversation holds and how its session is kept: conversations_store.py.

Added items are checked as a response's input is (a 400 names `items[i]`); `item_reference` items
resolve to a stored response's item, as in a response's input. Deleting an item that the
conversation's session holds lets the session go: the next response renders the remaining items on a
new one."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from agentserve.adapters.openai import responses_items as I
from agentserve.adapters.openai.conversations_store import Conversation, checked_item_list, listed_item
from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.adapters.openai.responses import ResponsesEndpoint
from agentserve.chat import limits as L
from agentserve.service.tenants import tenant_of_scope


class ConversationCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: Optional[list[Any]] = None
    metadata: Optional[dict[str, str]] = None


class ConversationUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, str]


class ConversationItemsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: list[Any]


class ConversationsEndpoint:
    def __init__(self, responses: ResponsesEndpoint) -> None:
        self.responses = responses
        self.store = responses.conversations

    def _get(self, conversation_id: str, raw_request: Any) -> Conversation:
        return self.store.get(conversation_id, tenant_of_scope(raw_request.scope).name)

    def _items(self, raw: Any, tenant: str) -> list[dict[str, Any]]:
        L.check_utf8(raw, "items")  # stored, echoed back and rendered into later responses' prompts
        items = self.responses.store.resolve_references(I.normalize_input(checked_item_list(raw, "items"), "items"),
                                                        tenant, "items")
        I.input_messages(items, field_name="items")  # each item checked as a response's input would be
        return [listed_item(item) for item in items]

    def create(self, req: ConversationCreateRequest, raw_request: Any) -> dict[str, Any]:
        tenant = tenant_of_scope(raw_request.scope).name
        if req.metadata:
            L.check_metadata(req.metadata)
        return self.store.create(tenant, req.metadata or {}, self._items(req.items, tenant)).body()

    def retrieve(self, conversation_id: str, raw_request: Any) -> dict[str, Any]:
        return self._get(conversation_id, raw_request).body()

    def update(self, conversation_id: str, req: ConversationUpdateRequest, raw_request: Any) -> dict[str, Any]:
        c = self._get(conversation_id, raw_request)
        L.check_metadata(req.metadata)
        c.metadata = dict(req.metadata)
        return c.body()

    async def delete(self, conversation_id: str, raw_request: Any) -> dict[str, Any]:
        c = self._get(conversation_id, raw_request)
        self.store.remove(c)  # 409 while a response runs on it
        await self._let_session_go(c)
        return {"id": c.conversation_id, "object": "conversation.deleted", "deleted": True}

    def list_items(self, conversation_id: str, raw_request: Any, limit: int, order: str,
                   after: Optional[str]) -> dict[str, Any]:
        c = self._get(conversation_id, raw_request)
        return I.input_items_page(c.items, limit, order, after, owner="item of this conversation")

    def add_items(self, conversation_id: str, req: ConversationItemsRequest, raw_request: Any) -> dict[str, Any]:
        c = self._get(conversation_id, raw_request)
        c.check_idle()
        items = self._items(req.items, c.tenant)
        if not items:
            raise OpenAIError(400, "items must hold at least one item", param="items")
        self.store.check_room(c, items, "items")
        self.store.append(c, items)
        return {"object": "list", "data": items, "first_id": items[0]["id"], "last_id": items[-1]["id"],
                "has_more": False}

    def get_item(self, conversation_id: str, item_id: str, raw_request: Any) -> dict[str, Any]:
        c = self._get(conversation_id, raw_request)
        return c.items[c.index_of(item_id)]

    async def delete_item(self, conversation_id: str, item_id: str, raw_request: Any) -> dict[str, Any]:
        c = self._get(conversation_id, raw_request)
        c.check_idle()
        index = c.index_of(item_id)
        self.store.delete_item(c, index)
        if index < c.session_items:  # the session holds the deleted item: its KV no longer matches
            await self._let_session_go(c)
        return c.body()

    async def _let_session_go(self, c: Conversation) -> None:
        """The conversation forgets its session, which closes unless a stored response holds it."""
        session_id = c.detach_session()
        if session_id is not None:
            await self.responses.release_session(session_id, c.tenant)
