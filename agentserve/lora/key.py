"""How caches key an adapter: by its id and load generation, never by its name alone (a name can be
unloaded and loaded again with other weights; KV computed under the old weights must not be found
under the new ones). No torch here: the prefix cache and requests import it."""

from __future__ import annotations

import itertools
from typing import NamedTuple


class LoRAKey(NamedTuple):
    adapter_id: int
    generation: int


class LoRAKeys:
    """The current key of each adapter name. `register` is called when an adapter is (re)loaded: a
    name seen before keeps its id and gets the next generation, so prefix-cache entries and slots
    of the earlier weights no longer match."""

    def __init__(self) -> None:
        self._keys: dict[str, LoRAKey] = {}
        self._ids = itertools.count(1)

    def register(self, name: str) -> LoRAKey:
        old = self._keys.get(name)
        key = LoRAKey(old.adapter_id, old.generation + 1) if old else LoRAKey(next(self._ids), 0)
        self._keys[name] = key
        return key

    def forget(self, name: str) -> None:
        """An unloaded name leaves the map (a record per name ever loaded grew without bound under adapters
        named per fine-tune job); loaded again it gets a fresh id from the counter, which never repeats, so
        no page of its earlier weights can match."""
        self._keys.pop(name, None)

    def key_of(self, name: str) -> LoRAKey:
        """The name's current key; a name not loaded through `register` gets one at first use."""
        key = self._keys.get(name)
        return key if key is not None else self.register(name)
