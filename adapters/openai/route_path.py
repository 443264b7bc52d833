"""The path a request's routes match: ASGI servers (uvicorn under --root-path) put root_path in front of
`path` ("/v1/models" behind a proxy at /api arrives as "/api/v1/models"), and the routes match without it
(Starlette strips it too). The gate's API-key and tenant checks and the error shape per route must read
the same path, or a root path would switch them off (vLLM strips root_path before its key check)."""

from __future__ import annotations

from typing import Any

from agentserve.adapters.anthropic.models import ANTHROPIC_VERSION_HEADER
from agentserve.adapters.anthropic.protocol import is_messages_path


def route_path(scope: Any) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def anthropic_shaped(scope: Any) -> bool:
    """Whether errors take Anthropic's shape: on the Messages API's routes, and on /v1/models for Anthropic's
    clients (the anthropic-version header), which get Anthropic's model objects there."""
    path = route_path(scope)
    if is_messages_path(path):
        return True
    return (path == "/v1/models" or path.startswith("/v1/models/")) and \
        ANTHROPIC_VERSION_HEADER.encode() in dict(scope.get("headers") or [])
