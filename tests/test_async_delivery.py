"""AsyncEngine's hand-over of a step's outputs to the request streams (engine/async_engine.py)."""

from __future__ import annotations

import asyncio
import threading

from agentserve.engine.async_engine import deliver


def test_one_callback_delivers_every_item_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        q1: asyncio.Queue = asyncio.Queue()
        q2: asyncio.Queue = asyncio.Queue()
        items = [(q1, "a"), (q2, "b"), (q1, "c")]
        calls = []
        original = loop.call_soon_threadsafe

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args)
            return original(*args, **kwargs)
        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        worker = threading.Thread(target=deliver, args=(loop, items))
        worker.start()
        worker.join()
        loop.run_until_complete(asyncio.sleep(0))
        assert len(calls) == 1  # one wake-up of the loop for the whole step
        assert [q1.get_nowait(), q1.get_nowait(), q2.get_nowait()] == ["a", "c", "b"]
    finally:
        loop.close()


def test_closed_loop_drops_its_items_without_raising() -> None:
    """A consumer's loop closed under a running step thread must not stop the thread (it serves others)."""
    loop = asyncio.new_event_loop()
    q: asyncio.Queue = asyncio.Queue()
    loop.close()
    deliver(loop, [(q, "x")])  # raised RuntimeError ("Event loop is closed") into the step thread before
    assert q.empty()
