"""Sessions' pages in CPU swap space, kept after a swap-in so that the next swap-out copies only what changed.

A session swapped out holds swap slots for its pages [swap_from, len(block_table)) (sessions/residency.py).
When it is swapped back in, the copies of its full pages stay valid: a session's history only grows (a
re-rendered history truncates it first, `keep_prefix`), so a page that was full when copied holds the
same keys and values for as long as the session keeps it. Such a session is RESIDENT and still holds
the slots of those pages (`Session.swap_slots` / `swap_from`: the kept copies), and when it is evicted
again only its pages without a copy go over PCIe: the turns since (a tool result and a reply, ~1-2k
tokens) instead of the whole conversation. SGLang's hierarchical cache keeps host copies in the same
way.

The kept copies are a cache: nothing needs them, so an eviction short of swap slots takes them from
other resident sessions (the most recently active first: they are the least likely to be evicted
soon) before it drops a session's KV. A partial last page is never kept (the next turn appends to
it), and with a draft model sharing the pages, a page counts as full only where the draft's KV was
computed too (the draft fills its positions later, into the same pages).

Slots freed here may still be read or written by a copy in flight; cache/swap_streams.py orders every
copy after the last earlier copy of each of its slots. AGENTSERVE_KEEP_SWAP_COPIES=0 keeps none (every
swap-out copies the whole session, the earlier behaviour), for A/B runs.
"""

from __future__ import annotations

import os
from typing import Optional

from agentserve.cache.swap_slots import SwapSlots
from agentserve.sessions.types import Session, SessionState

KEEP_SWAP_COPIES: bool = os.environ.get("AGENTSERVE_KEEP_SWAP_COPIES", "1") == "1"


class SwapCopies:
    """The swap slots of a store's sessions: a SWAPPED session's pages, and a RESIDENT one's kept copies."""

    def __init__(self, num_slots: int, sessions: dict[str, Session], block_size: int, pages_hold_draft: bool) -> None:
        self.slots = SwapSlots(num_slots)
        self.sessions = sessions
        self.block_size = block_size
        self.pages_hold_draft = pages_hold_draft

    @property
    def num_free(self) -> int:
        return self.slots.num_free

    def free(self, s: Session) -> None:
        """Frees every slot the session holds."""
        self.slots.free(s.swap_slots)
        s.swap_slots = []
        s.swap_from = 0

    def final_pages(self, s: Session) -> int:
        """Leading pages whose content no later step of the session rewrites: full, and (with a draft
        model) full of the draft's KV too."""
        tokens = s.num_computed
        if self.pages_hold_draft:
            tokens = min(tokens, s.num_draft_computed)
        return tokens // self.block_size

    def keep_final(self, s: Session, pages: Optional[int] = None) -> None:
        """Keeps only the copies of pages below `pages` (default: the session's final pages)."""
        end = self.final_pages(s) if pages is None else pages
        if not KEEP_SWAP_COPIES:
            end = 0
        keep = max(0, min(len(s.swap_slots), end - s.swap_from))
        self.slots.free(s.swap_slots[keep:])
        s.swap_slots = s.swap_slots[:keep]
        if not s.swap_slots:
            s.swap_from = 0

    def missing(self, s: Session, start: int, end: int) -> int:
        """How many of pages [start, end) have no copy."""
        lo, hi = s.swap_from, s.swap_from + len(s.swap_slots)
        return (end - start) - max(0, min(end, hi) - max(start, lo))

    def cover(self, s: Session, start: int) -> list[tuple[int, int]]:
        """Gives the session slots for its pages [start, len(block_table)), reusing its kept copies, and
        returns the (page, slot) pairs still to copy out. Needs `missing(...)` free slots."""
        table = s.block_table
        slot_of = {s.swap_from + i: slot for i, slot in enumerate(s.swap_slots)}
        self.slots.free([slot for page, slot in slot_of.items() if not start <= page < len(table)])
        to_copy = [page for page in range(start, len(table)) if page not in slot_of]
        for page, slot in zip(to_copy, self.slots.allocate(len(to_copy))):
            slot_of[page] = slot
        s.swap_slots = [slot_of[page] for page in range(start, len(table))]
        s.swap_from = start
        return [(table[page], slot_of[page]) for page in to_copy]

    def release_others(self, wanted: int, exclude: Session) -> int:
        """Frees kept copies of resident sessions other than `exclude` until `wanted` slots are free;
        returns how many sessions gave theirs up."""
        holders = [s for s in self.sessions.values()
                   if s is not exclude and s.state is SessionState.RESIDENT and s.swap_slots]
        released = 0
        for s in sorted(holders, key=lambda h: h.last_active, reverse=True):
            if self.slots.num_free >= wanted:
                break
            self.free(s)
            released += 1
        return released
