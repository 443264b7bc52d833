"""Rows of several tokens (speculative verification) with no model: the scheduler's budget and
lookahead slots, the rollback of num_computed_tokens by the rejected tokens, stops and max_tokens
inside a row, and outputs identical to decoding one token at a time under preemption and prefix
caching. The speculative tokens are injected: the target's own greedy continuation (accepted) and
tokens it would never generate (rejected)."""

from __future__ import annotations

from core_harness import CoreHarness, RequestStatus, greedy_continuation


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 101 + 7 * i) % 500 + 3 for i in range(length)]


def decode_ready(h: CoreHarness) -> list:
    """Running requests whose next row is a decode (their prompt is computed)."""
    return [r for r in h.scheduler.running if r.num_computed_tokens == r.num_tokens - 1]


def run_proposing(h: CoreHarness, num_correct: int, num_wrong: int, max_steps: int = 500) -> int:
    """Steps to the end, proposing before every step; returns the number of steps."""
    for steps in range(max_steps):
        if not h.scheduler.has_unfinished():
            return steps
        for request in decode_ready(h):
            h.propose(request, num_correct, num_wrong)
        h.step()
    raise AssertionError("unfinished")


def test_all_accepted_row_appends_k_plus_one_tokens() -> None:
    h = CoreHarness(block_size=4)
    r = h.add("r", prompt(1, 6), max_tokens=10)
    h.step()  # prefill, first token
    expected = greedy_continuation(r.all_token_ids, 4)
    spec = h.propose(r, 3)
    record = h.step()
    assert record.num_tokens == {"r": 4} and record.output.spec_token_ids == {"r": spec}
    assert record.appended["r"] == expected and record.num_accepted["r"] == 3
    assert r.num_computed_tokens == r.num_tokens - 1 and r.spec_token_ids == []


def test_rejected_tokens_roll_back_computed_and_keep_lookahead_pages() -> None:
    h = CoreHarness(block_size=4)
    r = h.add("r", prompt(2, 7), max_tokens=12)
    h.step()
    tokens_before = r.num_tokens
    h.propose(r, 1, 3)  # one right, three wrong: the row is 5 tokens, its KV reaches 4 positions ahead
    record = h.step()
    assert record.num_tokens == {"r": 5} and record.num_accepted["r"] == 1
    assert record.appended["r"] == greedy_continuation(r.all_token_ids[:tokens_before], 2)
    # The accepted token's KV is the sequence's; the three rejected ones are not.
    assert r.num_computed_tokens == tokens_before + 1 == r.num_tokens - 1
    # Lookahead slots were allocated for all 5 positions and stay with the request (overwritten later).
    assert len(r.block_table) == h.kv.blocks_needed(tokens_before + 4)
    h.run()
    assert h.outputs()["r"] == greedy_continuation(prompt(2, 7), 12)
    h.pool.check_all_free()


def test_first_token_rejected_appends_the_targets_token_only() -> None:
    h = CoreHarness(block_size=4)
    r = h.add("r", prompt(3, 5), max_tokens=6)
    h.step()
    h.propose(r, 0, 2)
    record = h.step()
    assert record.num_accepted["r"] == 0 and len(record.appended["r"]) == 1
    assert r.num_computed_tokens == r.num_tokens - 1


def test_stop_inside_the_accepted_tokens_finishes_with_tokens_left() -> None:
    h = CoreHarness(block_size=4)
    p = prompt(4, 6)
    continuation = greedy_continuation(p, 8)
    stop = continuation[2]  # the second token of the row (the row starts at continuation[1])
    assert stop not in continuation[:2]
    r = h.add("r", p, max_tokens=8, stop_token_ids=[stop])
    h.step()
    h.propose(r, 4)
    record = h.step()
    assert record.num_accepted["r"] == 4 and record.appended["r"] == [continuation[1], stop]
    assert r.status == RequestStatus.FINISHED_STOPPED and record.finished == ["r"]
    h.pool.check_all_free()


def test_spec_tokens_never_reach_past_max_tokens() -> None:
    h = CoreHarness(block_size=4)
    r = h.add("r", prompt(5, 6), max_tokens=3)
    h.step()
    h.propose(r, 5)
    record = h.step()
    # Two tokens of output are left: the row verifies one speculative token and samples two.
    assert record.num_tokens == {"r": 2} and len(record.output.spec_token_ids["r"]) == 1
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3
    h.pool.check_all_free()


def test_spec_tokens_are_cut_to_the_token_budget() -> None:
    h = CoreHarness(block_size=4, max_num_batched_tokens=8)
    a = h.add("a", prompt(6, 4), max_tokens=20)
    b = h.add("b", prompt(7, 4), max_tokens=20)
    h.step()
    h.propose(a, 5)
    h.propose(b, 5)
    record = h.step()
    assert record.num_tokens == {"a": 6, "b": 2}
    assert record.appended["a"] == greedy_continuation(prompt(6, 4), 7)[1:]


def test_outputs_match_one_token_decoding_under_preemption_and_prefix_caching() -> None:
    # 14 pages of 4 tokens for 4 requests of 10-token prompts and 16 outputs: preemptions happen,
    # lookahead slots make them likelier, and the shared prompt prefix is served from the cache.
    def workload(h: CoreHarness) -> None:
        shared = prompt(9, 8)
        for i in range(4):
            h.add(f"r{i}", shared + prompt(i, 2), max_tokens=16)

    plain = CoreHarness(num_blocks=14, block_size=4, max_num_batched_tokens=24)
    workload(plain)
    plain_steps = len(plain.run())
    for num_correct, num_wrong in [(3, 0), (1, 2), (0, 3), (2, 1)]:
        h = CoreHarness(num_blocks=14, block_size=4, max_num_batched_tokens=24)
        workload(h)
        steps = run_proposing(h, num_correct, num_wrong)
        assert h.outputs() == plain.outputs(), (num_correct, num_wrong)
        if num_correct == 3:
            assert steps < plain_steps
        h.pool.check_all_free()
    assert any(record.output.preempted for record in plain.steps)


def test_a_finished_requests_cached_pages_hold_its_tokens_after_rejections() -> None:
    # Rejected tokens' KV landed in pages that are later rewritten and cached; a request reusing
    # the finished sequence as its prompt must find the right KV there (check_running_kv reads it).
    h = CoreHarness(block_size=4)
    first = h.add("first", prompt(10, 5), max_tokens=11)
    run_proposing(h, 1, 2)
    follow = h.add("follow", first.all_token_ids + [5], max_tokens=2)
    h.step()
    # 16 tokens, the last one never computed: three full pages come from the cache.
    assert follow.num_cached_tokens == 12
    h.run()
    h.pool.check_all_free()
