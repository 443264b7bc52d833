"""KV pages: refcounts, chained prefix hashes, an LRU free list with lazy eviction, copy-on-write, fork.

A page (block) holds `block_size` consecutive tokens of one sequence's KV. Full pages get a chained
SHA-256 digest of (parent digest, extra key, tokens) so that identical prefixes (same tokens, same
adapter load, same tenant salt) find each other. A freed page keeps its digest and stays findable on
the free list until it is handed out again (lazy eviction, least recently freed first).

Why SHA-256 and not Python's `hash()`: a page found by its key is served as that prefix's KV, so two
different blocks with one key let a client choose what another client's request attends to. CPython's
tuple hash of small ints has no secret and near-collisions are found in minutes (vLLM's
CVE-2025-25183, after which its prefix cache hashes with SHA-256 by default). Cost: ~1 us per 16-token
block here, once per block of a prompt.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Hashable, Iterable, Optional, Sequence

import numpy as np

BlockHash = bytes
ExtraKey = Optional[Hashable]

_ROOT = bytes(32)  # the parent digest of a sequence's first block


def extra_key_bytes(extra_key: ExtraKey) -> bytes:
    """A canonical encoding of the extra key: a repr of None, ints, strings and (named) tuples of them
    (adapter ids and generations, tenant salts) is deterministic and tells any two such keys apart."""
    encoded = repr(extra_key).encode("utf-8", "surrogatepass")
    return len(encoded).to_bytes(4, "little") + encoded


def hash_block(parent_hash: Optional[BlockHash], token_ids: Sequence[int], extra_key: ExtraKey) -> BlockHash:
    tokens = np.asarray(token_ids, dtype="<i8").tobytes()
    return hashlib.sha256((parent_hash or _ROOT) + extra_key_bytes(extra_key) + tokens).digest()


def compute_block_hashes(token_ids: Sequence[int], block_size: int, extra_key: ExtraKey,
                         existing: list[BlockHash]) -> list[BlockHash]:
    """Extends `existing` (digests of the first full blocks) to cover every full block of token_ids."""
    hashes = list(existing)
    start = len(hashes) * block_size
    num_new = (len(token_ids) - start) // block_size
    if num_new <= 0:
        return hashes
    parent = hashes[-1] if hashes else _ROOT
    extra = extra_key_bytes(extra_key)
    # One conversion of the new blocks' tokens, then a slice of bytes per block (a numpy array per
    # 16-token block cost more than the digest).
    tokens = np.asarray(token_ids[start:start + num_new * block_size], dtype="<i8").tobytes()
    width = block_size * 8
    for i in range(num_new):
        parent = hashlib.sha256(parent + extra + tokens[i * width:(i + 1) * width]).digest()
        hashes.append(parent)
    return hashes


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Per page, indexed by page id: plain lists, not an object per page (a CPU pool of 1 GiB is ~131k pages:
        # building that many objects took ~0.15-0.5 s per engine, and the cycle collector walked them after).
        self._ref_cnt: list[int] = [0] * num_blocks
        self._hash: list[Optional[BlockHash]] = [None] * num_blocks
        # Free pages in eviction order: the first is handed out next (least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        # Prefix-cache statistics, in tokens.
        self.query_tokens = 0
        self.hit_tokens = 0

    # --- accounting ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def ref_cnt(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def referenced_blocks(self) -> list[int]:
        """Ids of the pages someone holds (ref count above 0)."""
        return [block_id for block_id, n in enumerate(self._ref_cnt) if n]

    def block_hash(self, block_id: int) -> Optional[BlockHash]:
        """The page's prefix hash while it is findable in the prefix cache (full and registered), else None."""
        return self._hash[block_id]

    # --- prefix cache ---------------------------------------------------------------------------
    def lookup(self, block_hashes: Sequence[BlockHash], max_blocks: int, num_query_tokens: int,
               count: bool = True) -> list[int]:
        """Longest run of cached full pages for these hashes (not yet referenced by the caller). count=False:
        a probe (a session's swap-in plan), not a prefix-cache query: the counters /metrics reads stay."""
        hits: list[int] = []
        if self.enable_prefix_caching:
            for h in block_hashes[:max_blocks]:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                hits.append(block_id)
        if count:
            self.query_tokens += num_query_tokens
            self.hit_tokens += len(hits) * self.block_size
        return hits

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Registers a page that just became full. A page already cached under another id keeps the
        older entry (both hold identical KV; the newer one is simply not findable)."""
        if not self.enable_prefix_caching:
            return
        if self._hash[block_id] is not None:
            return
        if block_hash not in self._cached:
            self._hash[block_id] = block_hash
            self._cached[block_hash] = block_id

    # --- references -------------------------------------------------------------------------------
    def touch(self, block_ids: Iterable[int]) -> None:
        """Takes one more reference on each page (pages found in the prefix cache, forks)."""
        ref_cnt = self._ref_cnt
        for block_id in block_ids:
            if ref_cnt[block_id] == 0:
                del self._free[block_id]
            ref_cnt[block_id] += 1

    def allocate(self, num: int) -> list[int]:
        if num > len(self._free):
            raise NoFreeBlocksError(f"need {num} pages, {len(self._free)} free")
        out = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            block_hash = self._hash[block_id]
            if block_hash is not None:  # lazy eviction: the reused page leaves the prefix cache
                if self._cached.get(block_hash) == block_id:
                    del self._cached[block_hash]
                self._hash[block_id] = None
            self._ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one reference on each page. Freed tail pages go first in eviction order, so that a
        sequence's prefix (shared by more requests) outlives its suffix."""
        ref_cnt = self._ref_cnt
        for block_id in reversed(block_ids):
            assert ref_cnt[block_id] > 0, f"double free of page {block_id}"
            ref_cnt[block_id] -= 1
            if ref_cnt[block_id] == 0:
                if self._hash[block_id] is None:
                    # An uncached page is worthless once free: hand it out before cached ones.
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)
                else:
                    self._free[block_id] = None

    def fork(self, block_ids: Sequence[int]) -> list[int]:
        """Shares every page with a new owner (copy-on-write happens on the first write)."""
        self.touch(block_ids)
        return list(block_ids)

    def reset_prefix_cache(self) -> bool:
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        return True

    def check_all_free(self) -> None:
        """Invariant when nothing runs and no session is open."""
        busy = self.referenced_blocks()
        assert not busy and len(self._free) == self.num_blocks, f"pages still referenced: {busy[:20]}"
