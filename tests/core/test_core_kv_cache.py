"""KVCacheManager + BlockPool with no model: prefix-cache hits (full pages only), lazy eviction in
LRU order, fork refcounts and copy-on-write of a forked partial last page, through the scheduler."""

from __future__ import annotations

from core_harness import CoreHarness

from agentserve.cache.device_ops import CopyBlocks

PROMPT = [(11 * i) % 300 + 3 for i in range(10)]  # 10 tokens: 2 full pages of 4 and 2 tokens


def test_prefix_cache_hits_full_pages_only() -> None:
    h = CoreHarness(block_size=4)
    h.add("first", PROMPT, max_tokens=2)
    h.run()
    second = h.add("second", PROMPT + [77, 78], max_tokens=2)
    record = h.step()
    # The 2 full pages of the shared prefix come from the cache; the partial third page never does.
    assert second.num_cached_tokens == 8 and record.num_tokens["second"] == 4
    h.run()
    h.pool.check_all_free()


def test_the_last_prompt_token_is_always_recomputed() -> None:
    h = CoreHarness(block_size=4)
    h.add("first", PROMPT[:8], max_tokens=1)
    h.run()
    again = h.add("again", PROMPT[:8], max_tokens=1)
    record = h.step()
    # Both pages are cached, but the last token's logits are needed: only the first page is a hit.
    assert again.num_cached_tokens == 4 and record.num_tokens["again"] == 4
    assert record.sampled["again"] == h.requests["first"].output_token_ids[0]
    h.pool.check_all_free()


def test_no_hits_across_adapters_or_tenants() -> None:
    h = CoreHarness(block_size=4)
    h.add("base", PROMPT, max_tokens=1)
    h.run()
    lora = h.add("lora", PROMPT, max_tokens=1, lora_name="adapter-a")
    salted = h.add("salted", PROMPT, max_tokens=1, cache_salt="tenant-b")
    h.run()
    assert lora.num_cached_tokens == 0 and salted.num_cached_tokens == 0
    h.add("base-again", PROMPT, max_tokens=1)
    h.run()
    assert h.requests["base-again"].num_cached_tokens == 8
    h.pool.check_all_free()


def test_no_hits_with_prefix_caching_off() -> None:
    h = CoreHarness(block_size=4, enable_prefix_caching=False)
    h.add("first", PROMPT, max_tokens=1)
    h.run()
    again = h.add("again", PROMPT, max_tokens=1)
    h.run()
    assert again.num_cached_tokens == 0 and h.pool.hit_tokens == 0
    h.pool.check_all_free()


def test_freed_pages_stay_findable_until_reused_least_recently_freed_first() -> None:
    h = CoreHarness(num_blocks=8, block_size=4)
    old = [(5 * i) % 200 + 3 for i in range(9)]
    new = [(7 * i) % 200 + 300 for i in range(9)]
    h.add("old", old, max_tokens=1)
    h.run()
    h.add("new", new, max_tokens=1)
    h.run()
    # Both prompts' 2 full pages are cached and free. Uncached pages are handed out first, then
    # cached ones in the order they were freed: "old"'s pages go before "new"'s.
    assert h.pool.num_free_blocks == 8
    filler = h.add("filler", [1] * 21, max_tokens=2, cache_salt="other")  # 6 pages: 4 uncached + old's 2
    h.step()
    assert len(filler.block_table) == 6
    h.abort(filler)
    assert len(h.kv.get_computed_blocks(h.make_request("probe-new", new))) == 2
    assert h.kv.get_computed_blocks(h.make_request("probe-old", old)) == []
    h.pool.check_all_free()


def test_a_sequences_tail_page_is_evicted_before_its_prefix() -> None:
    h = CoreHarness(num_blocks=6, block_size=4)
    tokens = [(3 * i) % 100 + 3 for i in range(13)]  # 3 full pages + 1 token
    h.add("seq", tokens, max_tokens=1)
    h.run()
    # Free: 2 never-used pages, the uncached partial page, then the 3 cached ones. Taking 4 pages
    # evicts one cached page: it must be the sequence's last full page, not its first.
    taker = h.add("taker", [1] * 13, max_tokens=2, cache_salt="other")
    h.step()
    h.abort(taker)
    hits = h.kv.get_computed_blocks(h.make_request("probe", tokens))
    assert len(hits) == 2, "the first two pages of the prefix outlive the third"
    h.pool.check_all_free()


def test_fork_shares_every_page_and_copies_the_partial_last_page_on_write() -> None:
    h = CoreHarness(block_size=4)
    parent = h.add("parent", PROMPT, max_tokens=6)
    h.step()  # the whole prompt; its first token is sampled
    shared = list(parent.block_table)
    child = h.fork(parent, "child", max_tokens=6)
    assert child.block_table == shared
    assert all(h.pool.ref_cnt(page) == 2 for page in shared)
    record = h.step()
    # The parent (running, scheduled first) appends its token to the shared partial page 2: it
    # writes into a private copy. The child then rewrites the last prompt token in page 2, by now
    # its alone, in place. Full pages stay shared.
    assert record.device_ops == [CopyBlocks(shared[2], parent.block_table[2])]
    assert parent.block_table[:2] == shared[:2] and parent.block_table[2] != shared[2]
    assert child.block_table == shared
    assert [h.pool.ref_cnt(page) for page in shared] == [2, 2, 1]
    h.run()
    assert h.requests["child"].output_token_ids[0] == parent.output_token_ids[0]
    h.pool.check_all_free()


def test_fork_of_a_page_aligned_prompt_copies_the_last_full_page() -> None:
    h = CoreHarness(block_size=4)
    parent = h.add("parent", PROMPT[:8], max_tokens=3)
    h.step()
    child = h.fork(parent, "child", max_tokens=3)
    shared = list(child.block_table)
    record = h.step()
    # The parent decodes into a fresh third page; the child rewrites position 7 of shared page 1.
    assert record.device_ops == [CopyBlocks(shared[1], child.block_table[1])]
    assert h.pool.ref_cnt(shared[0]) == 2
    h.run()
    h.pool.check_all_free()


def test_many_forks_hold_one_reference_each() -> None:
    h = CoreHarness(block_size=4)
    parent = h.add("parent", PROMPT, max_tokens=4)
    h.step()
    children = [h.fork(parent, f"child{i}", max_tokens=4) for i in range(3)]
    assert all(h.pool.ref_cnt(page) == 4 for page in parent.block_table)
    h.abort(children[0])
    assert all(h.pool.ref_cnt(page) == 3 for page in parent.block_table)
    h.run()
    outputs = h.outputs()
    assert outputs["child1"] == outputs["child2"] == outputs["parent"]
    h.pool.check_all_free()


def test_a_reloaded_adapter_name_does_not_hit_the_pages_of_its_earlier_load() -> None:
    h = CoreHarness(block_size=4)
    h.add("before", PROMPT, max_tokens=1, lora_name="adapter-a")
    h.run()
    same_load = h.add("same", PROMPT, max_tokens=1, lora_name="adapter-a")
    h.run()
    h.lora_keys.register("adapter-a")  # unloaded and loaded again: new weights, new generation
    reloaded = h.add("reloaded", PROMPT, max_tokens=1, lora_name="adapter-a")
    h.run()
    assert same_load.num_cached_tokens == 8 and reloaded.num_cached_tokens == 0
    assert same_load.lora_key != reloaded.lora_key and same_load.lora_key.adapter_id == reloaded.lora_key.adapter_id
    h.pool.check_all_free()
