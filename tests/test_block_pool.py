"""Pages: refcounts, chained hashes with extra keys, LRU reuse, copy-on-write, fork."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.cache.block_pool import BlockPool, NoFreeBlocksError, compute_block_hashes
from agentserve.cache.device_ops import CopyBlocks
from agentserve.cache.kv_cache_manager import KVCacheManager
from agentserve.request import Request


def make_request(tokens: list[int], rid: str = "r", **kw: object) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), **kw)  # type: ignore[arg-type]


def test_chained_hashes_depend_on_prefix_and_extra_key() -> None:
    a = compute_block_hashes(list(range(8)), 4, None, [])
    b = compute_block_hashes([99] + list(range(1, 8)), 4, None, [])
    c = compute_block_hashes(list(range(8)), 4, ("lora-a", None), [])
    assert len(a) == 2
    assert a[1] != b[1], "the second block's hash must depend on the first block"
    assert a[0] != c[0], "pages are never shared across adapters or tenants"
    assert compute_block_hashes(list(range(10)), 4, None, a[:1]) == a  # incremental = from scratch


# Two different 16-token blocks (SmolLM2's 49,152-token vocabulary) whose Python tuple hashes are equal:
# found in about a minute of one core by a near-collision search over 2^25 candidates. With `hash()` as
# the page key, a request whose first block was A was served B's cached KV (vLLM's CVE-2025-25183).
COLLIDING_A = [17708, 41394, 13981, 25995, 19639, 39450, 48111, 45014, 17522, 15993, 11521, 34473, 6269, 35287,
               33802, 0]
COLLIDING_B = [11491, 23438, 25751, 16609, 66, 43266, 42049, 43946, 44002, 39268, 33752, 32793, 19346, 35014, 2679,
               5250]


def test_blocks_colliding_under_python_hash_get_distinct_keys() -> None:
    assert hash(tuple(COLLIDING_A)) == hash(tuple(COLLIDING_B))  # the pair the old key confused
    assert compute_block_hashes(COLLIDING_A, 16, None, []) != compute_block_hashes(COLLIDING_B, 16, None, [])
    pool = BlockPool(num_blocks=4, block_size=16)
    kv = KVCacheManager(pool)
    first = make_request(COLLIDING_B + [1], "b")
    kv.allocate_slots(first, 17)
    first.num_computed_tokens = 17
    kv.cache_full_blocks(first)
    assert kv.get_computed_blocks(make_request(COLLIDING_A + [1], "a")) == [], "A must not find B's page"
    assert kv.get_computed_blocks(make_request(COLLIDING_B + [1], "b2")) == first.block_table[:1], "B still finds its own page"


def test_extra_keys_are_told_apart_by_value() -> None:
    tokens = list(range(4))
    keys = [None, (None, None), (None, ""), (None, "salt"), ((1, 0), None), ((1, 1), None), ((1, 0), "salt")]
    digests = {compute_block_hashes(tokens, 4, key, [])[0] for key in keys}
    assert len(digests) == len(keys)


def test_refcounts_and_lru_reuse_of_cached_pages() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    kv = KVCacheManager(pool)
    r1 = make_request(list(range(9)))
    assert kv.allocate_slots(r1, 9) == []
    r1.num_computed_tokens = 9
    kv.cache_full_blocks(r1)
    assert pool.num_free_blocks == 1
    kv.free(r1)
    assert pool.num_free_blocks == 4
    # Same prefix: the two full pages come back from the cache, not recomputed.
    r2 = make_request(list(range(9)) + [50])
    hits = kv.get_computed_blocks(r2)
    assert len(hits) == 2
    kv.allocate_slots(r2, 2, hits)
    assert r2.num_computed_tokens == 8 and r2.block_table[:2] == hits
    assert all(pool.ref_cnt(b) == 1 for b in r2.block_table)
    kv.free(r2)
    pool.check_all_free()
    # Filling the pool with other tokens evicts the cached pages (lazily, least recently freed first).
    r3 = make_request(list(range(100, 116)))
    kv.allocate_slots(r3, 16)
    assert kv.get_computed_blocks(make_request(list(range(9)))) == []
    kv.free(r3)


def test_allocation_failure_changes_nothing() -> None:
    pool = BlockPool(num_blocks=2, block_size=4)
    kv = KVCacheManager(pool)
    r = make_request(list(range(12)))
    assert kv.allocate_slots(r, 12) is None
    assert r.block_table == [] and pool.num_free_blocks == 2
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)


def test_fork_shares_pages_and_writes_copy_on_write() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    kv = KVCacheManager(pool)
    parent = make_request(list(range(6)))
    kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = make_request(list(range(6)) + [7], rid="c")
    child.block_table = kv.fork_blocks(parent.block_table)
    child.num_computed_tokens = 6
    assert all(pool.ref_cnt(b) == 2 for b in parent.block_table)
    # The child writes token 6 into the shared partial page 1: it must get a private copy first.
    copies = kv.allocate_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # the full page stays shared
    assert child.block_table[1] != parent.block_table[1]
    assert pool.ref_cnt(parent.block_table[1]) == 1
    kv.free(child)
    kv.free(parent)
    pool.check_all_free()


def test_shared_pages_never_written_in_place_by_engine() -> None:
    """Every slot the runner writes belongs to a page that only the writing request holds."""
    from agentserve.llm import LLM
    from agentserve.testing import tiny_model_cached

    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", block_size=4)
    engine = llm.engine
    original = engine.runner.launch
    violations: list[str] = []

    def checking_launch(chunks, device_ops, *a, **kw):  # type: ignore[no-untyped-def]
        copied_to = {op.dst for op in device_ops if isinstance(op, CopyBlocks)}
        for chunk in chunks:
            req = chunk.request
            start = req.num_computed_tokens
            for pos in range(start, start + chunk.num_tokens):
                page = req.block_table[pos // 4]
                if engine.pool.ref_cnt(page) != 1 and page not in copied_to:
                    violations.append(f"{req.request_id} writes shared page {page}")
        return original(chunks, device_ops, *a, **kw)

    engine.runner.launch = checking_launch  # type: ignore[method-assign]
    prompt = "Shared prefix for several requests that fork and share pages"
    llm.generate([prompt] * 3 + [prompt + " with a tail"],
                 SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=9, ignore_eos=True))
    assert not violations, violations[:5]
