"""Engines release what they hold: LLM.close() / `with LLM(...)`, Engine.close() and
AsyncEngine.shutdown() free the KV pages, the pinned swap space, the weights, the CUDA graphs and
the grammar workers, stop the step thread, and are idempotent; a second engine in the same process
works. The GPU test checks the device memory comes back and a second engine of the same size fits."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest
import torch

from agentserve import SamplingParams
from agentserve.engine.async_engine import AsyncEngine
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

PROMPT = [5, 17, 42, 99, 3, 250, 7]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def wait_for_threads_to_end(names: set[str], timeout: float = 10.0) -> list[str]:
    """The names of live threads among `names` after waiting up to `timeout` for them to end."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [t.name for t in threading.enumerate() if t.name in names]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_llm_close_frees_kv_swap_and_weights_and_a_second_engine_works() -> None:
    path = str(tiny_model_cached("llama"))
    with LLM(path, device="cpu", dtype="float32", swap_space_gb=0.01) as llm:
        first = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
        runner = llm.engine.runner
        kv_ref = weakref.ref(runner.kv_cache.layers[0][0])
        swap_ref = weakref.ref(runner.kv_cache.swap)
        assert runner.kv_cache.swap.numel() > 0
        weight = next(runner.model.parameters())
        assert not weight.is_meta
    gc.collect()
    assert kv_ref() is None and swap_ref() is None
    assert all(p.is_meta for p in runner.model.parameters())
    llm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(PROMPT, GREEDY)
    with LLM(path, device="cpu", dtype="float32") as second:
        assert second.generate(PROMPT, GREEDY)[0].outputs[0].token_ids == first


def test_async_engine_shutdown_stops_the_step_thread_and_grammar_workers() -> None:
    path = str(tiny_model_cached("qwen2"))
    aeng = AsyncEngine.from_kwargs(path, device="cpu", dtype="float32", num_blocks=128)

    async def run() -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=12, json_schema={"type": "object"})
        last = None
        async for out in aeng.generate("constrained", PROMPT, params):
            last = out
        assert last is not None and last.finished
        return last.outputs[0].token_ids

    assert asyncio.run(run())
    assert "agentserve-step" in {t.name for t in threading.enumerate()}
    kv_ref = weakref.ref(aeng.engine.runner.kv_cache.layers[0][0])
    aeng.shutdown()
    aeng.shutdown()  # idempotent
    assert wait_for_threads_to_end({"agentserve-step", "grammar-compile"}) == []
    # The compile-timeout watch of a finished compile is cancelled, not left to run out its 30 s.
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
    gc.collect()
    assert kv_ref() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_comes_back_and_a_second_large_engine_fits() -> None:
    path = str(tiny_model_cached("llama"))
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    # The KV pool takes most of the device: without the release a second one cannot fit.
    llm = LLM(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.85, swap_space_gb=1)
    first = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert torch.cuda.memory_allocated() - start > 2**30
    llm.close()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - start < 64 * 2**20
    with LLM(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.85, swap_space_gb=1) as second:
        assert second.generate(PROMPT, GREEDY)[0].outputs[0].token_ids == first
