"""The scheduler's multi-LoRA cap, model-free: at most max_loras distinct adapters among running
requests (so each step's adapters fit the device slots); requests of other adapters wait, skipped
over, while base requests and requests of running adapters are admitted past them; nothing waits
forever, and the output equals a run without the cap."""

from __future__ import annotations

from core_harness import CoreHarness


def _run(max_loras: int | None) -> tuple[CoreHarness, dict[str, list[int]]]:
    h = CoreHarness(num_blocks=128, max_num_seqs=8)
    h.scheduler.max_loras = max_loras
    plan = [("r0", "a"), ("r1", "b"), ("r2", None), ("r3", "c"), ("r4", "a"), ("r5", None), ("r6", "b")]
    for i, (rid, adapter) in enumerate(plan):
        h.add(rid, [1 + i, 2, 3, 4, 5], max_tokens=3 + i % 3, lora_name=adapter)
    h.run()
    return h, h.outputs()


def test_at_most_max_loras_distinct_adapters_run_at_once() -> None:
    h, outputs = _run(max_loras=1)
    first = h.steps[0].output.scheduled
    # Step 1: a's request, the base requests and a's second request pass b and c (skipped, still queued).
    assert [r.request_id for r in first] == ["r0", "r2", "r4", "r5"]
    for record in h.steps:
        adapters = {r.lora_key for r in record.output.scheduled if r.lora_key is not None}
        assert len(adapters) <= 1
    assert set(outputs) == {f"r{i}" for i in range(7)}  # all finished: no deadlock
    _, uncapped = _run(max_loras=None)
    assert outputs == uncapped
    assert not h.scheduler.has_unfinished()
