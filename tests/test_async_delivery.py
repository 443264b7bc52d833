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


def test_switch_interval_is_shortened_never_lengthened() -> None:
    """The step thread gets the GIL back within the engine's switch interval (0.5 ms by default, not
    CPython's 5 ms); a process that set a shorter one keeps it, and 0 leaves the interpreter's."""
    import sys

    from agentserve.engine.async_engine import SWITCH_INTERVAL_MS, shorten_switch_interval
    before = sys.getswitchinterval()
    try:
        assert SWITCH_INTERVAL_MS == 0.5
        sys.setswitchinterval(0.005)
        shorten_switch_interval()
        assert abs(sys.getswitchinterval() - 0.0005) < 1e-9
        sys.setswitchinterval(0.0001)
        shorten_switch_interval()
        assert abs(sys.getswitchinterval() - 0.0001) < 1e-9
        sys.setswitchinterval(0.005)
        shorten_switch_interval(0.0)
        assert abs(sys.getswitchinterval() - 0.005) < 1e-9
    finally:
        sys.setswitchinterval(before)
