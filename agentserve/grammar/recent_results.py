"""A small thread-safe LRU of results keyed by a request part's canonical JSON: agent loops send the
same tool list (or structural tag) on every turn, and what the host builds from it (the tool schemas'
check, the tool-call payload, the structural tag's payload) is a pure function of that JSON."""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Generic, Optional, TypeVar

from agentserve.grammar.interface import canonical_json

T = TypeVar("T")


class RecentResults(Generic[T]):
    """`get_or_build(parts, build)`: build(...)'s result for these parts, computed once while they stay
    among the last `capacity` distinct ones. A build that raises is not kept (the next call raises
    again). Parts that are not JSON (a caller's own objects) are built every time."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._results: collections.OrderedDict[str, T] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, parts: Any, build: Callable[[], T]) -> T:
        key = self._key(parts)
        if key is None:
            return build()
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        result = build()
        with self._lock:
            self._results[key] = result
            while len(self._results) > self._capacity:
                self._results.popitem(last=False)
        return result

    @staticmethod
    def _key(parts: Any) -> Optional[str]:
        try:
            return canonical_json(parts)
        except (TypeError, ValueError):  # not JSON-serializable, or NaN
            return None
