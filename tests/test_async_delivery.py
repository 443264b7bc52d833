"""AsyncEngine's hand-over of a step's outputs to the request streams, and its queue bound (engine/async_engine.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentserve import SamplingParams
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine, deliver
from agentserve.engine.engine import Engine
from agentserve.errors import QueueFullError
from agentserve.testing.tiny import tiny_model_cached


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


def test_the_queue_bound_counts_each_requests_n() -> None:
    """vLLM V1 fans n out into n requests: an engine bounded at 3 in flight holds one request of n=2 and one
    of n=1, not a second of n=2 (a few requests of n=128 held many times the bound before)."""
    aeng = AsyncEngine(Engine(EngineConfig.from_kwargs(str(tiny_model_cached("llama")), device="cpu", num_blocks=64,
                                                       max_model_len=128)), max_pending=3)

    async def drain(rid: str, params: SamplingParams) -> None:
        async for _ in aeng.generate(rid, [5, 6, 7], params):
            pass

    async def body() -> None:
        wide = asyncio.ensure_future(drain("wide", SamplingParams(n=2, max_tokens=100, ignore_eos=True)))
        for _ in range(2000):  # the wide request's two sequences are in flight (it counted as one before)
            if aeng.num_pending >= 2:
                break
            await asyncio.sleep(0.005)
        assert aeng.num_pending == 2
        with pytest.raises(QueueFullError, match="adds 2"):
            await drain("second-wide", SamplingParams(n=2, max_tokens=2))
        await drain("narrow", SamplingParams(max_tokens=2))
        await wide
        assert aeng.num_pending == 0

    try:
        asyncio.run(body())
    finally:
        aeng.shutdown()
