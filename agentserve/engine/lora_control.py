"""The engine's side of multi-LoRA: adapter names -> keys at add_request, and loading / unloading
by name with the checks that need the engine's view (which requests and sessions use a name).

The manager (lora/manager.py, built by the model runner) owns the weights, slots and the
name -> key map; without LoRA enabled there is no manager and names only key the prefix cache
(the behaviour before multi-LoRA, which cache-isolation tests rely on)."""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Callable, Optional

from agentserve.errors import (AdapterInUseError, AdapterNameError, AdapterNameTakenError, AdapterNotFoundError,
                               LoRANotEnabledError)
from agentserve.lora.key import LoRAKey, LoRAKeys
from agentserve.lora.manager import MultiLoRAManager, PreparedAdapter

if TYPE_CHECKING:
    from agentserve.engine.engine import Engine

# Shown in "in use" messages: enough ids to find the users, not a wall of them.
_MAX_NAMED = 8
# Adapter names travel as `model` in HTTP bodies, in /metrics labels and in logs: bounded, printable.
MAX_ADAPTER_NAME_CHARS = 256


def check_adapter_name(name: str) -> None:
    """Raises AdapterNameError (HTTP 400 / INVALID_ARGUMENT) for a name no client could use
    reliably: empty, padded with whitespace, holding control characters, or too long."""
    if not name:
        raise AdapterNameError("the adapter name must not be empty")
    if len(name) > MAX_ADAPTER_NAME_CHARS:
        raise AdapterNameError(f"the adapter name is {len(name)} characters long; the limit is "
                               f"{MAX_ADAPTER_NAME_CHARS}")
    if name != name.strip():
        raise AdapterNameError(f"the adapter name {name!r} starts or ends with whitespace; strip it")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise AdapterNameError(f"the adapter name {name!r} holds control or format characters; use printable ones")


class LoRAControl:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.manager = engine.runner.lora_manager
        self.keys = self.manager.keys if self.manager is not None else LoRAKeys()
        if self.manager is not None:
            engine.scheduler.max_loras = self.manager.max_loras  # admission keeps a step's adapters in slots
            engine.scheduler.lora_slot_wait_s = engine.config.lora.lora_slot_wait_s
            for name, path in engine.config.lora.lora_modules.items():
                self._check_new_name(name, replace=False)
                self.manager.load(name, path)
        # Open sessions bound to a key (set by the session store: the engine does not import sessions).
        self.session_users: Optional[Callable[[LoRAKey], list[str]]] = None
        # Under API keys, the tenant that loaded each adapter at run time: only it may replace or unload it
        # (another tenant's load_inplace swapped the weights under the owner's requests). Adapters from
        # lora_modules, or loaded without keys, have no owner and no tenant may manage them.
        self._owners: dict[str, str] = {}

    def resolve(self, name: Optional[str]) -> Optional[LoRAKey]:
        """The key a new request with adapter `name` runs under (None: the base model)."""
        if name is None:
            return None
        if self.manager is None:
            return self.keys.key_of(name)
        key = self.manager.key_of(name)
        if key is None:
            loaded = ", ".join(repr(n) for n in self.manager.names()) or "none"
            raise AdapterNotFoundError(f"LoRA adapter {name!r} is not loaded (loaded: {loaded})")
        return key

    def users(self, name: str) -> tuple[list[str], list[str]]:
        """(request ids, session ids) that use the name's current weights."""
        key = self.manager.key_of(name) if self.manager is not None else None
        if key is None:
            return [], []
        requests = [r.parent_id for r in self.engine.requests.values()
                    if r.lora_key == key and not r.is_finished]
        sessions = self.session_users(key) if self.session_users is not None else []
        return list(dict.fromkeys(requests)), sessions

    def _check_unused(self, name: str, action: str) -> None:
        requests, sessions = self.users(name)
        if not requests and not sessions:
            return
        # With API keys the users may be other tenants': their request and session ids (a request id can be the
        # client's own X-Request-Id) are theirs to know, so only the counts are told.
        server = self.engine.config.server
        named = not (server.api_key or server.api_key_file)
        parts = []
        if requests:
            parts.append(f"{len(requests)} request(s)" + (f" ({', '.join(requests[:_MAX_NAMED])})" if named else ""))
        if sessions:
            parts.append(f"{len(sessions)} open session(s)" + (f" ({', '.join(sessions[:_MAX_NAMED])})" if named else ""))
        raise AdapterInUseError(f"cannot {action} LoRA adapter {name!r}: it is in use by {' and '.join(parts)}; "
                                "close the sessions and wait for the requests, or unload with drain")

    def _require_manager(self) -> MultiLoRAManager:
        if self.manager is None:
            raise LoRANotEnabledError("LoRA is not enabled on this server (start it with --enable-lora)")
        return self.manager

    def base_model_names(self) -> frozenset[str]:
        """Every `model` value that means the base model (an adapter under one would be unreachable)."""
        names = set(self.engine.config.model.accepted_model_names())
        if self.engine.model_path is not None:
            names.add(str(self.engine.model_path))
        return frozenset(names)

    def _check_new_name(self, name: str, replace: bool) -> None:
        """A name a load may bind: valid, not the base model's, and not a loaded adapter's unless
        the caller asked to replace it (an accidental second load must not swap weights under users)."""
        manager = self._require_manager()  # without LoRA that is the answer, whatever the name
        check_adapter_name(name)
        if name in self.base_model_names():
            raise AdapterNameTakenError(f"the adapter name {name!r} is the base model's name; requests naming it would "
                                        "get the base model, never the adapter: choose another name")
        if not replace and manager.key_of(name) is not None:
            raise AdapterNameTakenError(f"LoRA adapter {name!r} is already loaded (from {manager.path_of(name)}); "
                                        "unload it first, or load with replace (HTTP: load_inplace) to swap its weights")

    def load(self, name: str, path: str, replace: bool = True) -> None:
        """Loads `name` (a reload gets a new generation: no cached KV of the old weights is reused).
        Replacing a name that requests or sessions use is refused (AdapterInUseError)."""
        self.install(self.read(name, path, replace), replace)

    def read(self, name: str, path: str, replace: bool, tenant: Optional[str] = None) -> PreparedAdapter:
        """Checks the name, then reads and checks the adapter (any thread: the name map is replaced,
        never changed in place); LoRAAdapterError names what is wrong with it. The name is checked
        again in `install`, which is authoritative (another load may bind it meanwhile). `tenant`: the
        caller's under API keys (None without keys and offline)."""
        self._check_new_name(name, replace)
        self._check_owner(name, tenant, "replace")
        return self._require_manager().read(name, path)

    def install(self, prepared: PreparedAdapter, replace: bool, tenant: Optional[str] = None) -> None:
        """Binds a read adapter to its name (step thread)."""
        manager = self._require_manager()
        self._check_new_name(prepared.name, replace)
        self._check_owner(prepared.name, tenant, "replace")
        if manager.key_of(prepared.name) is not None:
            self._check_unused(prepared.name, "replace")
        manager.install(prepared.name, prepared)
        if tenant is not None:
            self._owners[prepared.name] = tenant
        self._forget_released()

    def unload(self, name: str, drain: bool = False, tenant: Optional[str] = None) -> None:
        """Forgets `name`. Refused while requests or open sessions use it, unless `drain`: then new
        requests can no longer name it and those running finish on its weights."""
        manager = self._require_manager()
        if manager.key_of(name) is None:
            raise AdapterNotFoundError(f"LoRA adapter {name!r} is not loaded")
        self._check_owner(name, tenant, "unload")
        if not drain:
            self._check_unused(name, "unload")
        manager.unload(name)
        self._owners.pop(name, None)
        self._forget_released()

    def _check_owner(self, name: str, tenant: Optional[str], action: str) -> None:
        """Under API keys a loaded adapter is managed by the tenant that loaded it alone."""
        manager = self._require_manager()
        if tenant is None or manager.key_of(name) is None or self._owners.get(name) == tenant:
            return
        raise AdapterNameTakenError(f"cannot {action} LoRA adapter {name!r}: another tenant or the server's "
                                    "--lora-modules loaded it, and only its loader manages it; load yours under "
                                    "another name")

    def _forget_released(self) -> None:
        """Drops the records of replaced or unloaded weights that no request or session holds now
        (those a drained request still holds go at a later load or unload)."""
        manager = self._require_manager()
        held = {r.lora_key for r in self.engine.requests.values() if not r.is_finished}
        for key in manager.unbound_keys():
            if key in held or (self.session_users is not None and self.session_users(key)):
                continue
            manager.forget(key)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """(names of the adapters running requests use, names of those only waiting requests use), for
        /metrics (vLLM's lora_requests_info). Callable from any thread: the queues are copied first
        (one C-level copy each under the GIL) and only read after."""
        if self.manager is None:
            return [], []
        names = {key: name for name in self.manager.names() if (key := self.manager.key_of(name)) is not None}
        scheduler = self.engine.scheduler
        running = {names.get(r.lora_key, "?") for r in list(scheduler.running) if r.lora_key is not None}
        waiting = {names.get(r.lora_key, "?") for r in list(scheduler.waiting) if r.lora_key is not None}
        return sorted(running), sorted(waiting - running)
