"""What the serving layers (gRPC, HTTP) and the engine need of a LoRA manager, as a typed protocol,
so that callers use one API instead of guessing at one. An engine without LoRA has
`engine.lora_manager = None`: callers answer "not enabled" (gRPC UNIMPLEMENTED, HTTP 404 for an
adapter name) rather than probing for methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable

from agentserve.lora.key import LoRAKey


@runtime_checkable
class LoRAManager(Protocol):
    def names(self) -> list[str]:
        """The adapters a request may name (loaded, on the GPU or in the CPU tier), in load order."""
        ...

    def load(self, name: str, path: str) -> None:
        """Loads (or reloads, as a new generation) the PEFT adapter directory at `path` as `name`;
        raises LoRAAdapterError naming what is wrong with it."""
        ...

    def unload(self, name: str) -> None:
        """Forgets `name`; requests already running with it finish on the weights they started with.
        (Whether anything still uses it is the engine's check: engine/lora_control.py.)"""
        ...

    def path_of(self, name: str) -> Optional[Path]:
        """The directory the name's current weights were loaded from; None when it is not loaded."""
        ...

    def key_of(self, name: str) -> Optional[LoRAKey]:
        """The name's current key (id + load generation); None when it is not loaded."""
        ...

    def activate(self, keys: Sequence[Optional[LoRAKey]]) -> list[int]:
        """Makes the adapters of one step's rows resident in GPU slots (least recently used slots
        reused); returns each row's slot index, -1 for a row on the base model (key None). Keys,
        not names: a request keeps the weights it started with across a reload of its name."""
        ...


def adapter_names(manager: Optional[LoRAManager]) -> list[str]:
    """The adapters a request may name; none without a manager."""
    return manager.names() if manager is not None else []


def adapter_root(manager: Optional[LoRAManager], name: str) -> Optional[str]:
    """The directory an adapter was loaded from (vLLM's model card `root`); None when it is not loaded."""
    path = manager.path_of(name) if manager is not None else None
    return str(path) if path is not None else None
