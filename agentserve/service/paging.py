"""ListSessions paging, as Google AIP-158 and Kubernetes list APIs page: page sizes and page tokens.

Page size: 0 is the server's default (DEFAULT_PAGE_SIZE); larger than MAX_PAGE_SIZE is coerced down to
it (AIP-158: coerce, not refuse); negative is INVALID_ARGUMENT naming `page_size`.

Page token: where the previous page ended, the SessionListCursor (created_at, session id) of its last
session, so the next page resumes after that place in the order whatever was created or closed
meanwhile (sessions/store.py `list`). Opaque to clients: urlsafe base64 (unpadded) of a 16-byte
HMAC-SHA256 tag followed by the cursor's JSON. The tag covers the caller's tenant too, under a secret
drawn when the server starts, so a token edited or made up by a client, or issued to another tenant,
fails the check and is INVALID_ARGUMENT naming `page_token`; it never becomes a position in another
tenant's list, and the error says nothing about whose token it was. Tokens do not outlive the server
(nor do its sessions).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
from typing import Optional

from agentserve.errors import InvalidRequestError
from agentserve.sessions.types import SessionListCursor, SessionSnapshot

DEFAULT_PAGE_SIZE = 100   # page_size 0
MAX_PAGE_SIZE = 1000      # larger page sizes are coerced to this
MAX_PAGE_TOKEN_CHARS = 512  # the tokens made here are far shorter; a longer one is refused before decoding

_TAG_BYTES = 16
_TOKEN_VERSION = 1
_BAD_TOKEN = ("page_token is not a valid page token for this caller: pass the next_page_token of a previous "
              "ListSessions response to the same API key's tenant unchanged, or leave it empty for the first page")


def page_size_of(requested: int) -> int:
    """The page size a request gets: its own, the default for 0, at most MAX_PAGE_SIZE."""
    if requested < 0:
        raise InvalidRequestError(f"page_size must be >= 0 (0: the server's default, {DEFAULT_PAGE_SIZE}; "
                                  f"at most {MAX_PAGE_SIZE} are returned), got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class PageTokens:
    """Makes and checks page tokens under one secret (one per server)."""

    def __init__(self, secret: Optional[bytes] = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def _tag(self, tenant: str, payload: bytes) -> bytes:
        # Tenant names never contain a newline (service/tenants.py), so (tenant, payload) pairs never collide.
        return hmac.new(self._secret, tenant.encode() + b"\n" + payload, hashlib.sha256).digest()[:_TAG_BYTES]

    def encode(self, after: SessionListCursor, tenant: str) -> str:
        payload = json.dumps([_TOKEN_VERSION, after.created_at, after.session_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._tag(tenant, payload) + payload).rstrip(b"=").decode("ascii")

    def next_page_token(self, page: list[SessionSnapshot], more: bool, tenant: str) -> str:
        """The token after `page`'s last session, or "" when no session follows it (the last page)."""
        if not more or not page:
            return ""
        return self.encode(SessionListCursor(page[-1].created_at, page[-1].session_id), tenant)

    def decode(self, token: str, tenant: str) -> SessionListCursor:
        """The cursor a token of this tenant's carries; InvalidRequestError (naming page_token) otherwise."""
        if len(token) > MAX_PAGE_TOKEN_CHARS or not token.isascii():
            raise InvalidRequestError(_BAD_TOKEN)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidRequestError(_BAD_TOKEN) from None
        tag, payload = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        # The one spelling encode() gives these bytes: no stray characters or padding bits let through.
        canonical = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == token
        if not canonical or len(tag) != _TAG_BYTES or not hmac.compare_digest(tag, self._tag(tenant, payload)):
            raise InvalidRequestError(_BAD_TOKEN)
        # Signed by this server for this tenant: the payload is one encode() wrote. Checked all the
        # same, so that a change of format can never turn into a server fault.
        try:
            version, created_at, session_id = json.loads(payload)
        except (ValueError, TypeError):
            raise InvalidRequestError(_BAD_TOKEN) from None
        if (version != _TOKEN_VERSION or not isinstance(created_at, float) or not math.isfinite(created_at)
                or not isinstance(session_id, str)):
            raise InvalidRequestError(_BAD_TOKEN)
        return SessionListCursor(created_at, session_id)
