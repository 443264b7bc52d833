"""Scheduler unit tests with no model: chunked prefill under the token budget, max_num_seqs,
admission with an output reserve, preemption by recompute, and the page invariant at the end."""

from __future__ import annotations

from core_harness import CoreHarness, RequestStatus


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 101 + 7 * i) % 500 + 3 for i in range(length)]


def test_long_prompt_is_chunked_under_the_token_budget() -> None:
    h = CoreHarness(max_num_batched_tokens=16)
    h.add("long", prompt(1, 50), max_tokens=3)
    chunks = [record.num_tokens["long"] for record in h.run()]
    assert chunks == [16, 16, 16, 2, 1, 1]
    assert h.requests["long"].num_output_tokens == 3
    h.pool.check_all_free()


def test_running_decodes_come_first_and_a_new_prompt_takes_the_rest_of_the_budget() -> None:
    h = CoreHarness(max_num_batched_tokens=16)
    h.add("a", prompt(1, 6), max_tokens=20)
    h.add("b", prompt(2, 6), max_tokens=20)
    h.step()  # both prompts in one step: 12 tokens
    h.add("c", prompt(3, 40), max_tokens=2)
    record = h.step()
    assert [r.request_id for r in record.output.scheduled] == ["a", "b", "c"]
    assert record.num_tokens == {"a": 1, "b": 1, "c": 14}
    for record in h.run():
        assert record.output.total_num_scheduled_tokens <= 16
    h.pool.check_all_free()


def test_max_num_seqs_caps_the_running_set() -> None:
    h = CoreHarness(max_num_seqs=2)
    for i in range(5):
        h.add(f"r{i}", prompt(i, 5), max_tokens=3)
    admitted_order = []
    for record in h.run():
        assert h.scheduler.num_running <= 2 and len(record.output.scheduled) <= 2
        admitted_order += [rid for rid in record.num_tokens if rid not in admitted_order]
    assert admitted_order == [f"r{i}" for i in range(5)]  # first come, first served
    assert all(len(out) == 3 for out in h.outputs().values())
    h.pool.check_all_free()


def test_a_middle_prefill_chunk_samples_nothing() -> None:
    h = CoreHarness(max_num_batched_tokens=8)
    h.add("r", prompt(4, 12), max_tokens=2)
    first = h.step()
    assert first.num_tokens == {"r": 8} and first.sampled == {}
    second = h.step()
    assert second.num_tokens == {"r": 4} and list(second.sampled) == ["r"]
    h.run()
    h.pool.check_all_free()


# 12 pages of 4 tokens. Each request: a 16-token prompt (4 pages) and 12 output tokens (3 more pages).
def _admission_run(decode_reserve_tokens: int) -> CoreHarness:
    h = CoreHarness(num_blocks=12, block_size=4, max_num_batched_tokens=64,
                    decode_reserve_tokens=decode_reserve_tokens, enable_prefix_caching=False)
    for i in range(3):
        h.add(f"r{i}", prompt(i, 16), max_tokens=12)
    return h


def test_admission_reserve_keeps_room_for_output() -> None:
    h = _admission_run(decode_reserve_tokens=12)
    first = h.step()
    # r0 targets 7 pages (prompt + 12 outputs): r1 would need 7 more with only 12 - 7 unclaimed.
    assert list(first.num_tokens) == ["r0"] and h.scheduler.num_waiting == 2
    records = h.run()
    assert not any(record.output.preempted for record in records)
    assert all(r.num_preemptions == 0 for r in h.requests.values())
    h.pool.check_all_free()


def test_without_reserve_the_pool_runs_dry_and_the_newest_is_preempted_by_recompute() -> None:
    h = _admission_run(decode_reserve_tokens=0)
    first = h.step()
    # With no output reserve, three 4-page prompts (plus the next token's page) look like they fit.
    assert list(first.num_tokens) == ["r0", "r1"]
    preempted = []
    for _ in range(200):
        if not h.scheduler.has_unfinished():
            break
        record = h.step()
        for victim in record.output.preempted:
            preempted.append(victim.request_id)
            # Recompute: the victim holds no pages, starts over, and waits at the head of the queue.
            assert victim.block_table == [] and victim.num_computed_tokens == 0
            assert victim.status == RequestStatus.PREEMPTED and h.scheduler.waiting[0] is victim
            assert victim not in h.scheduler.running
    assert preempted, "the pool should have run dry"
    assert preempted[0] == "r1", "the newest running request is the victim"
    reference = _admission_run(decode_reserve_tokens=12)
    reference.run()
    assert h.outputs() == reference.outputs(), "recompute must not change what is generated"
    h.pool.check_all_free()


def test_a_request_that_cannot_fit_next_to_others_preempts_itself_last() -> None:
    h = CoreHarness(num_blocks=6, block_size=4, enable_prefix_caching=False)
    h.add("a", prompt(1, 8), max_tokens=12)
    h.add("b", prompt(2, 8), max_tokens=12)
    h.run()
    assert h.requests["b"].num_preemptions >= 1 and h.requests["a"].num_preemptions == 0
    assert all(len(out) == 12 for out in h.outputs().values())
    h.pool.check_all_free()


def test_priority_policy_serves_the_lowest_priority_value_first() -> None:
    h = CoreHarness(max_num_seqs=1, policy="priority")
    h.add("late", prompt(1, 4), max_tokens=1, priority=5)
    h.add("urgent", prompt(2, 4), max_tokens=1, priority=0)
    assert list(h.step().num_tokens) == ["urgent"]
    assert list(h.step().num_tokens) == ["late"]
    h.pool.check_all_free()


def test_a_request_waiting_for_its_grammar_is_skipped_without_losing_its_place() -> None:
    h = CoreHarness()
    blocked = h.add("grammar", prompt(1, 4), max_tokens=1)
    blocked.status = RequestStatus.WAITING_FOR_GRAMMAR
    h.add("plain", prompt(2, 4), max_tokens=1)
    assert list(h.step().num_tokens) == ["plain"]
    assert list(h.scheduler.waiting) == [blocked]
    blocked.status = RequestStatus.WAITING
    assert list(h.step().num_tokens) == ["grammar"]
    h.pool.check_all_free()


def test_abort_frees_pages_wherever_the_request_is() -> None:
    h = CoreHarness(max_num_seqs=1)
    running = h.add("running", prompt(1, 9), max_tokens=50)
    waiting = h.add("waiting", prompt(2, 9), max_tokens=50)
    h.step()
    assert running.block_table and not waiting.block_table
    h.abort(running)
    h.abort(waiting)
    assert not h.scheduler.has_unfinished()
    h.pool.check_all_free()
