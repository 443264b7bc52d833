"""The step thread does not spin while every request waits on something outside the step (a session
turn whose swapped-out pages are still being copied in): it naps between polls, so a waiting queue
costs neither a core nor the GIL the event loop needs, and the request still runs once its pages are in."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from agentserve import SamplingParams
from agentserve.engine.async_engine import IDLE_STEP_NAP_S, AsyncEngine
from agentserve.request import Request
from agentserve.testing import tiny_model_cached

PROMPT = [5, 17, 42, 99, 3, 250, 7]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
COPY_SECONDS = 0.4


class SlowCopyIn:
    """An admit hook whose pages take COPY_SECONDS to arrive after restore() (a swap in's copy in
    flight): the scheduler skips the request meanwhile, and nothing else is queued."""

    def __init__(self) -> None:
        self.restored_at: Optional[float] = None

    def pages_to_restore(self) -> tuple[int, int]:
        return 0, 0  # nothing was resident: the request recomputes its prompt once admitted

    def restore(self, request: Request) -> None:
        if self.restored_at is None:
            self.restored_at = time.monotonic()

    def restoring(self) -> bool:
        return self.restored_at is not None and time.monotonic() - self.restored_at < COPY_SECONDS


def test_the_step_loop_naps_while_the_only_request_waits_for_its_pages() -> None:
    aeng = AsyncEngine.from_kwargs(str(tiny_model_cached("llama")), device="cpu", dtype="float32", num_blocks=64)
    steps = 0
    real_step = aeng.engine.step

    def counted_step() -> list:
        nonlocal steps
        steps += 1
        return real_step()

    async def tokens(request_id: str, hook: Optional[SlowCopyIn]) -> list[int]:
        last = None
        async for out in aeng.generate(request_id, PROMPT, GREEDY, admit_hook=hook):
            last = out
        assert last is not None and last.finished
        return last.outputs[0].token_ids

    try:
        plain = asyncio.run(tokens("plain", None))
        aeng.engine.step = counted_step  # type: ignore[method-assign]
        hook = SlowCopyIn()
        start = time.monotonic()
        waited = asyncio.run(tokens("waits", hook))
        elapsed = time.monotonic() - start
    finally:
        aeng.shutdown()
    assert waited == plain
    assert hook.restored_at is not None and elapsed >= COPY_SECONDS
    # A spinning loop calls step() thousands of times in COPY_SECONDS (tens of microseconds per empty step);
    # a napping one at most once per nap, plus the request's own steps once its pages are in.
    assert steps <= 1.5 * COPY_SECONDS / IDLE_STEP_NAP_S + 50, steps
    # ...and still polls: the copy's arrival is noticed within a few naps, not after a long sleep.
    assert elapsed < COPY_SECONDS + 1.0
