"""Request-level page management on top of BlockPool: prefix hits, slot allocation with
copy-on-write of shared pages, caching of newly full pages, freeing."""

from __future__ import annotations

from typing import Optional

from agentserve.cache.block_pool import BlockPool, compute_block_hashes
from agentserve.lora.key import LoRAKey
from agentserve.request import Request


def extra_key_of(request: Request) -> Optional[tuple[Optional[LoRAKey], Optional[str]]]:
    # Pages are never shared across adapters (nor across loads of one adapter name) or tenants.
    if request.lora_key is None and request.cache_salt is None:
        return None
    return (request.lora_key, request.cache_salt)


class KVCacheManager:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, request: Request) -> None:
        if len(request.block_hashes) < request.num_tokens // self.block_size:
            request.block_hashes = compute_block_hashes(
                request.all_token_ids, self.block_size, extra_key_of(request), request.block_hashes)

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached full pages of the request's prefix. At least the last token is always recomputed:
        its logits are needed to sample."""
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        if request.prompt_logprobs is not None:
            # Cached pages carry no logits: only the positions already scored may come from the cache.
            max_blocks = min(max_blocks, (request.num_prompt_logprobs_planned - 1) // self.block_size)
        return self.pool.lookup(request.block_hashes, max_blocks, request.num_tokens)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Optional[list[int]] = None) -> Optional[list[tuple[int, int]]]:
        """Makes room for `num_new_tokens` after the computed ones. Returns the (src, dst) page copies
        the runner must do first (copy-on-write of shared pages about to be written), or None when
        there are not enough free pages (nothing is changed then)."""
        if not new_computed_blocks and num_new_tokens == 1:
            # Decode fast path (most calls): the token lands in a private page or needs one more page.
            table, idx = request.block_table, request.num_computed_tokens // self.block_size
            if idx < len(table) and self.pool.ref_cnt(table[idx]) == 1:
                return []
            if idx == len(table):
                if self.pool.num_free_blocks < 1:
                    return None
                table.extend(self.pool.allocate(1))
                return []
        new_computed_blocks = new_computed_blocks or []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        table_len = len(request.block_table) + len(new_computed_blocks)
        first_written = num_computed // self.block_size
        last_needed = self.blocks_needed(num_computed + num_new_tokens)
        # Shared pages in the written range need a private copy; a cached page held only here is
        # rewritten with identical KV and stays as it is.
        table = request.block_table + new_computed_blocks
        shared = [i for i in range(first_written, min(table_len, last_needed)) if self.pool.ref_cnt(table[i]) > 1]
        num_fresh = max(0, last_needed - table_len) + len(shared)
        # Cached pages taken from the free list count against the free pages.
        num_revived = sum(1 for b in new_computed_blocks if self.pool.ref_cnt(b) == 0)
        if num_fresh + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(new_computed_blocks)
        request.block_table.extend(new_computed_blocks)
        request.num_computed_tokens = num_computed
        fresh = self.pool.allocate(num_fresh)
        copies = []
        for i in shared:
            dst = fresh.pop()
            copies.append((request.block_table[i], dst))
            self.pool.free([request.block_table[i]])
            request.block_table[i] = dst
        request.block_table.extend(fresh)
        return copies

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the pages whose tokens are all computed now (or queued for computing on the
        device: later readers are ordered after the writes). With async scheduling the computed
        count can include a token still in flight, whose id the hash cannot know yet."""
        if not self.pool.enable_prefix_caching:
            return
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_known // self.block_size, len(request.block_table))
        if num_full <= request.num_registered_blocks:
            return
        self.update_block_hashes(request)
        for i in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_table[i], request.block_hashes[i])
        request.num_registered_blocks = num_full

    def free(self, request: Request) -> None:
        self.pool.free(request.block_table)
        request.block_table = []
        request.num_registered_blocks = 0

    def fork_blocks(self, block_table: list[int]) -> list[int]:
        return self.pool.fork(block_table)
