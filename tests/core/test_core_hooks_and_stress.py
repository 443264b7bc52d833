"""The scheduler's hooks for page owners outside it (sessions): reclaiming idle pages before
preempting, handing a queued turn its pages at admission. And a seeded random workload (shared
prefixes, forks, aborts, a small pool) whose every step keeps each request's KV intact."""

from __future__ import annotations

import random


from core_harness import CoreHarness, Request


def _two_requests_next_to_idle_pages(with_reclaim: bool) -> tuple[CoreHarness, list[tuple[int, str]], list[int]]:
    # 8 pages: an idle owner holds 3; each request needs 4 (16 tokens) by its end.
    h = CoreHarness(num_blocks=8, block_size=4, enable_prefix_caching=False)
    idle_pages = h.pool.allocate(3)  # an idle session's pages, held outside the scheduler
    asked: list[tuple[int, str]] = []

    def reclaim(wanted: int, requester: Request) -> int:
        asked.append((wanted, requester.request_id))
        if not idle_pages:
            return 0
        freed = len(idle_pages)
        h.pool.free(idle_pages)
        idle_pages.clear()
        return freed

    if with_reclaim:
        h.scheduler.reclaim = reclaim
    h.add("a", list(range(3, 11)), max_tokens=8)
    h.add("b", list(range(20, 28)), max_tokens=8)
    h.run()
    return h, asked, idle_pages


def test_idle_pages_are_reclaimed_to_admit_a_waiting_request() -> None:
    h, asked, idle_pages = _two_requests_next_to_idle_pages(with_reclaim=True)
    assert asked and not idle_pages
    assert list(h.steps[0].num_tokens) == ["a", "b"], "both fit once the idle pages are given back"
    h.pool.check_all_free()
    control, _, idle_pages = _two_requests_next_to_idle_pages(with_reclaim=False)
    assert list(control.steps[0].num_tokens) == ["a"], "b waits for a's pages without the reclaim"
    assert control.outputs() == h.outputs()
    control.pool.free(idle_pages)
    control.pool.check_all_free()


class SessionPages:
    """An admit hook that hands a queued turn the pages of its conversation so far."""

    def __init__(self, h: CoreHarness, history: list[int]) -> None:
        self.h = h
        self.history = history
        self.pages: list[int] = []
        self.restored = False

    def pages_to_restore(self) -> tuple[int, int]:
        return 0, len(self.pages)

    def restore(self, request: Request) -> None:
        if self.restored:
            return
        request.block_table = self.pages
        request.num_computed_tokens = len(self.history) - 1  # the last token's logits are needed
        self.restored = True

    def restoring(self) -> bool:
        return False


class SlowCopyPages(SessionPages):
    """Like SessionPages, but the pages' copy takes `polls` more scheduler checks to arrive after the
    restore (a swap in whose host-to-device copy is in flight)."""

    def __init__(self, h: CoreHarness, history: list[int], polls: int) -> None:
        super().__init__(h, history)
        self.polls = polls
        self.checks = 0

    def restoring(self) -> bool:
        if not self.restored:
            return False
        self.checks += 1
        return self.checks <= self.polls


def _queue_turn(h: CoreHarness, hook: SessionPages, history: list[int]) -> Request:
    """Queues the session's next turn over `history`, its KV written into pages the hook hands over."""
    turn = h.make_request("turn2", history, max_tokens=2)
    hook.pages = h.pool.allocate(3)
    for position, token in enumerate(history):
        h.pages.write(hook.pages[position // 4], position % 4, token)
    turn.admit_hook = hook
    h.scheduler.add(turn)
    return turn


def test_a_queued_turn_gets_its_sessions_pages_when_admitted() -> None:
    h = CoreHarness(block_size=4, enable_prefix_caching=False)
    history = list(range(3, 13))
    first = h.add("turn1", history[:-1], max_tokens=1)
    h.run()
    assert first.output_token_ids  # the turn's KV is in pages now freed; a session would keep them
    hook = SessionPages(h, history)
    turn = _queue_turn(h, hook, history)
    record = h.step()
    assert hook.restored and turn.admit_hook is None
    assert record.num_tokens == {"turn2": 1}, "only the last token is recomputed"
    h.run()
    h.pool.check_all_free()


def test_random_workload_keeps_every_requests_kv_and_frees_every_page() -> None:
    rng = random.Random(1234)
    h = CoreHarness(num_blocks=14, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
    prefixes = [[rng.randrange(3, 400) for _ in range(rng.randint(4, 14))] for _ in range(3)]
    counter = 0
    for _ in range(200):
        roll = rng.random()
        if roll < 0.25 and counter < 40:
            tail = [rng.randrange(3, 400) for _ in range(rng.randint(1, 10))]
            h.add(f"r{counter}", rng.choice(prefixes) + tail, max_tokens=rng.randint(1, 24))
            counter += 1
        elif roll < 0.3 and h.scheduler.running:
            parent = rng.choice(h.scheduler.running)
            if parent.num_output_tokens == 1:  # where the engine forks n > 1 siblings
                h.fork(parent, f"f{counter}", max_tokens=rng.randint(1, 6))
                counter += 1
        elif roll < 0.33 and h.scheduler.running:
            h.abort(rng.choice(h.scheduler.running))
        h.step()  # checks every running request's KV after the step
    h.run()
    assert h.pool.hit_tokens > 0, "shared prefixes should have hit the cache"
    assert sum(r.num_preemptions for r in h.requests.values()) > 0, "the pool should have run dry"
    h.pool.check_all_free()


def test_a_waiting_fork_never_starves_the_request_ahead_of_it() -> None:
    # n=2 with max_num_seqs=1: the sibling is forked after the leader's first token and waits,
    # sharing the leader's pages. The leader's first write copies the partial prompt page, so the
    # sibling holds one page alone; the leader runs dry at 28 tokens and preempts itself, is
    # readmitted on its 2 cached pages, runs dry again at 29 and now needs 6 pages with 5 free.
    # Nothing runs and the sibling behind it holds pages the leader needs: the scheduler releases
    # the waiting sibling's pages (it recomputes later) instead of spinning forever.
    h = CoreHarness(num_blocks=8, block_size=4, max_num_seqs=1)
    leader = h.add("leader", list(range(3, 13)), max_tokens=22)  # 32 tokens: all 8 pages
    h.step()
    h.fork(leader, "sibling", max_tokens=22)
    h.run(max_steps=300)
    h.pool.check_all_free()


def _turn_behind_a_copy(polls: int) -> tuple[CoreHarness, SlowCopyPages, Request, Request]:
    h = CoreHarness(block_size=4, enable_prefix_caching=False)
    history = list(range(3, 13))
    h.add("turn1", history[:-1], max_tokens=1)
    h.run()
    hook = SlowCopyPages(h, history, polls=polls)
    turn = _queue_turn(h, hook, history)
    other = h.add("other", list(range(40, 46)), max_tokens=3)  # behind the turn in the queue
    return h, hook, turn, other


def test_a_turn_whose_pages_are_still_copying_waits_and_the_queue_moves_on() -> None:
    h, hook, turn, other = _turn_behind_a_copy(polls=3)
    first = h.step()
    assert hook.restored and turn.admit_hook is hook, "restored, but its copy has not arrived"
    assert "turn2" not in first.num_tokens and first.num_tokens.get("other") == 6, "the queue moved on"
    while turn.admit_hook is not None:
        record = h.step()
        assert "turn2" not in record.num_tokens or turn.admit_hook is None
    assert hook.checks > hook.polls
    h.run()
    assert turn.output_token_ids and other.output_token_ids
    control, control_hook, _, _ = _turn_behind_a_copy(polls=0)
    assert "turn2" in control.step().num_tokens  # no copy in flight: admitted at once
    control.run()
    assert h.outputs() == control.outputs(), "waiting for the copy changes no token"
    h.pool.check_all_free()
