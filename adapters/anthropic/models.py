"""GET /v1/models in Anthropic's shape for Anthropic's clients (they send an `anthropic-version` header on every
request; OpenAI's clients do not): a page of model objects (type, id, display_name, created_at, the context
length as max_input_tokens) instead of OpenAI's list. The served models and adapters are the same."""

from __future__ import annotations

import datetime
from typing import Any

ANTHROPIC_VERSION_HEADER = "anthropic-version"


def anthropic_model(card: dict[str, Any]) -> dict[str, Any]:
    """One of OpenAI's model cards (adapters/openai/serving.py) as Anthropic's model object."""
    created = datetime.datetime.fromtimestamp(card["created"], tz=datetime.timezone.utc)
    return {"type": "model", "id": card["id"], "display_name": card["id"],
            "created_at": created.isoformat().replace("+00:00", "Z"), "max_input_tokens": card["max_model_len"],
            "max_tokens": card["max_model_len"], "lifecycle": "active"}


def anthropic_model_page(openai_list: dict[str, Any]) -> dict[str, Any]:
    models = [anthropic_model(card) for card in openai_list["data"]]
    return {"data": models, "has_more": False, "first_id": models[0]["id"] if models else None,
            "last_id": models[-1]["id"] if models else None}
