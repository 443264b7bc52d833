"""Tenants: API keys -> tenant, each tenant's prefix-cache namespace, and per-tenant request limits.

Every API key maps to a tenant (`--api-key` may be repeated; `--api-key-file` holds `key[:tenant]`
lines). Keys that name the same tenant share it. A key without a tenant name gets `tenant-<n>`, from
its position (CLI keys first, then the file's lines): never the key itself, so logs and metrics that
name tenants never carry a key. Without any key configured every client is the anonymous tenant ""
(one namespace, as before tenants existed).

Isolation: a tenant's sessions are invisible to other tenants (sessions/store.py checks the owner),
and each tenant's requests hash their KV pages under the tenant's own cache salt (refined by the
request's `cache_salt`), so a prefix-cache hit — visible as `cached_tokens` — only ever comes from the
same tenant's earlier requests.

Limits: `max_requests_per_tenant` generation requests (queued or running) per tenant, shared by gRPC
and HTTP, once API keys are configured (a server without keys has one tenant, bounded only by the
engine's queue, as in vLLM); the session limits live in the session store.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from agentserve.config import ServerConfig

ANONYMOUS = ""  # the one tenant of a server without API keys
TENANT_SCOPE_KEY = "agentserve.tenant"  # where the HTTP gate puts the caller's Tenant in scope["state"]
SLOT_SCOPE_KEY = "agentserve.request_slot"  # ... and the HeldRequestSlot a generation request took
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TenantLimitError(Exception):
    """A tenant is at its limit of requests in flight (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


@dataclass(frozen=True)
class Tenant:
    name: str  # ANONYMOUS without API keys

    def cache_salt(self, request_salt: Optional[str]) -> Optional[str]:
        """The salt a request's KV page hashes get: the tenant's namespace, refined by the request's
        own salt. Tenant names cannot contain ';' (they match _TENANT_NAME), so no two (tenant,
        salt) pairs give the same string."""
        if self.name == ANONYMOUS:
            return request_salt
        return f"tenant={self.name}" + (f";salt={request_salt}" if request_salt else "")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_api_key_lines(lines: Sequence[str], source: str) -> list[tuple[str, Optional[str]]]:
    """`key[:tenant]` lines -> [(key, tenant or None)]; blank lines and '#' comments are skipped.
    A key cannot contain ':' (the first ':' starts the tenant name). Errors name the line, never the key."""
    out: list[tuple[str, Optional[str]]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, tenant = line.partition(":")
        key, tenant = key.strip(), tenant.strip()
        if not key:
            raise ValueError(f"{source}, line {number}: the API key is empty")
        if sep and not _TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"{source}, line {number}: the tenant name must be 1-64 letters, digits, '.', '_' "
                             "or '-' (starting with a letter or digit)")
        out.append((key, tenant if sep else None))
    return out


def load_api_keys(api_key: Union[str, list[str], None], api_key_file: Optional[str]) -> list[tuple[str, Optional[str]]]:
    """The configured keys in order: the `--api-key` values (each taken whole: it names no tenant),
    then the file's lines."""
    keys: list[tuple[str, Optional[str]]] = []
    for k in [api_key] if isinstance(api_key, str) else list(api_key or []):
        if not k:
            raise ValueError("--api-key: the API key is empty")
        keys.append((k, None))
    if api_key_file:
        try:
            text = Path(api_key_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--api-key-file {api_key_file}: {e.strerror or e}") from None
        keys += parse_api_key_lines(text.splitlines(), f"--api-key-file {api_key_file}")
    return keys


class Tenants:
    """Authentication (key -> Tenant) and the per-tenant count of requests in flight. The counts are
    touched only on the server's event loop (gRPC and HTTP share it), so they need no lock."""

    def __init__(self, keys: Sequence[tuple[str, Optional[str]]] = (), *,
                 max_requests_per_tenant: int = ServerConfig.model_fields["max_requests_per_tenant"].default) -> None:
        self._by_digest: dict[bytes, Tenant] = {}
        given = {name for _, name in keys if name}
        for position, (key, name) in enumerate(keys, start=1):
            if not name and f"tenant-{position}" in given:
                # Two keys would share one tenant (its sessions, responses, cache) with nobody having said so.
                raise ValueError(f"API key #{position} has no tenant name, so it would be tenant 'tenant-{position}', "
                                 "which another key names explicitly; name this key's tenant, or rename the other")
            tenant = Tenant(name or f"tenant-{position}")
            previous = self._by_digest.setdefault(_digest(key), tenant)
            if previous != tenant:
                raise ValueError(f"API key #{position} is also configured for tenant {previous.name!r}; "
                                 "a key belongs to one tenant")
        self.max_requests_per_tenant = max_requests_per_tenant
        self._in_flight: dict[str, int] = {}

    @classmethod
    def from_config(cls, server: ServerConfig) -> "Tenants":
        return cls(load_api_keys(server.api_key, server.api_key_file),
                   max_requests_per_tenant=server.max_requests_per_tenant)

    @property
    def requires_key(self) -> bool:
        return bool(self._by_digest)

    @property
    def names(self) -> list[str]:
        return sorted({t.name for t in self._by_digest.values()})

    def authenticate(self, presented: Optional[str]) -> Optional[Tenant]:
        """The tenant of a presented key; None when it is missing or wrong. Without configured keys,
        everyone is the anonymous tenant. The lookup is by SHA-256 of the key, so its timing says
        nothing about how much of a wrong key matched."""
        if not self._by_digest:
            return Tenant(ANONYMOUS)
        if not presented:
            return None
        return self._by_digest.get(_digest(presented))

    def in_flight(self, tenant: Tenant) -> int:
        return self._in_flight.get(tenant.name, 0)

    def acquire(self, tenant: Tenant, count: int = 1) -> None:
        """Takes `count` of the tenant's request slots (a request of n sequences takes n, as the engine's
        queue counts them); TenantLimitError when they are not left."""
        n = self._in_flight.get(tenant.name, 0)
        if n + count > self.max_requests_per_tenant and tenant.name != ANONYMOUS:
            wanted = "" if count == 1 else f"; {count} more asked"
            raise TenantLimitError(f"too many requests in flight for this API key ({n}, limit "
                                   f"{self.max_requests_per_tenant}{wanted}); retry when some have finished")
        self._in_flight[tenant.name] = n + count

    def release(self, tenant: Tenant, count: int = 1) -> None:
        left = self._in_flight[tenant.name] - count
        if left:
            self._in_flight[tenant.name] = left
        else:
            del self._in_flight[tenant.name]

    @contextlib.contextmanager
    def request_slot(self, tenant: Tenant) -> Iterator[None]:
        """Holds one of the tenant's request slots for the duration (acquire/release)."""
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)


class HeldRequestSlot:
    """One request slot the HTTP gate took for a generation request. The gate gives it back when the
    request ends, unless the endpoint kept it for work that outlives the request (a background
    response), which then releases it itself when that work ends."""

    def __init__(self, tenants: Tenants, tenant: Tenant) -> None:
        self._tenants, self._tenant = tenants, tenant
        self.kept = False
        self._released = False
        self._count = 1

    def keep(self) -> "HeldRequestSlot":
        self.kept = True
        return self

    def widen(self, count: int) -> None:
        """Holds `count` slots in all (a request's prompts x n, known once its body is read): n sequences
        counted as one let one tenant fill the engine's queue under its own request limit."""
        if count > self._count and not self._released:
            try:
                self._tenants.acquire(self._tenant, count - self._count)
            except TenantLimitError:
                raise TenantLimitError(f"this request is {count} sequences (prompts x n), each one of this API key's "
                                       f"requests in flight (limit {self._tenants.max_requests_per_tenant}, "
                                       f"{self._tenants.in_flight(self._tenant)} held with this one); send fewer, or "
                                       "retry when some have finished") from None
            self._count = count

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._tenants.release(self._tenant, self._count)


def held_slot_of_scope(scope: Mapping[str, Any]) -> Optional[HeldRequestSlot]:
    """The slot the HTTP gate took for this request (None when the app runs without the gate)."""
    slot = scope.get("state", {}).get(SLOT_SCOPE_KEY)
    return slot if isinstance(slot, HeldRequestSlot) else None


def tenant_of_scope(scope: Mapping[str, Any]) -> Tenant:
    """The tenant the HTTP gate put into an ASGI scope (anonymous when the app runs without it)."""
    tenant = scope.get("state", {}).get(TENANT_SCOPE_KEY)
    return tenant if isinstance(tenant, Tenant) else Tenant(ANONYMOUS)
