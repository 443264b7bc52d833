"""Engines release what they hold: LLM.close() / `with LLM(...)`, Engine.close() and
AsyncEngine.shutdown() free the KV pages, the pinned swap space, the weights, the CUDA graphs and
the grammar workers, stop the step thread, and are idempotent; a second engine in the same process
works. After close no tensor storage stays reachable from the engine (with a draft model and LoRA too).
The GPU tests check the device memory comes back (CUDA graphs and a draft model's included) and a
second engine of the same size fits."""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import threading
import time
import types
import weakref
from typing import Any, Optional

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


def closure_values(fn: types.FunctionType) -> list[Any]:
    values = []
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a cell not yet assigned holds nothing
            pass
    return values


def reachable_tensor_bytes(root: object) -> dict[str, int]:
    """Storage bytes of every non-meta tensor reachable from `root`, by the first path that reached it:
    through agentserve objects, torch modules, containers, bound methods, closures and partials (not
    through weak proxies, which keep nothing alive)."""
    found: dict[str, int] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, "engine")]
    while stack:
        obj, path = stack.pop()
        if obj is None or isinstance(obj, (str, bytes, int, float, type, types.ModuleType, *weakref.ProxyTypes)):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not obj.is_meta and obj.untyped_storage().nbytes():
                found[path] = obj.untyped_storage().nbytes()
            continue
        children: list[tuple[Any, str]] = []
        if isinstance(obj, dict):
            children = [(v, f"{path}[{k!r}]") for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif isinstance(obj, types.MethodType):
            children = [(obj.__self__, f"{path}.__self__"), (obj.__func__, path)]
        elif isinstance(obj, types.FunctionType):
            children = [(value, f"{path}.<closure>") for value in closure_values(obj)]
        elif isinstance(obj, functools.partial):
            children = [(obj.func, path), *((a, f"{path}(arg)") for a in obj.args),
                        *((v, f"{path}({k}=)") for k, v in obj.keywords.items())]
        elif type(obj).__module__.startswith("agentserve") or isinstance(obj, torch.nn.Module):
            attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
            for cls in type(obj).__mro__:
                attrs.update({n: getattr(obj, n) for n in getattr(cls, "__slots__", ()) if hasattr(obj, n)})
            children = [(v, f"{path}.{k}") for k, v in attrs.items()]
        stack.extend(children)
    return found


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


def test_deleting_an_llm_frees_its_engine_without_waiting_for_a_garbage_collection() -> None:
    """`del llm` then a new LLM (as benchmarks do): the engine's reference cycles must not keep the
    first engine's KV pages and weights until the collector happens to run."""
    path = str(tiny_model_cached("llama"))
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    engine = llm.engine
    kv_ref = weakref.ref(engine.runner.kv_cache.layers[0][0])
    gc.disable()  # only reference counting may free it
    try:
        del llm
        assert engine.closed and kv_ref() is None
        assert all(p.is_meta for p in engine.runner.model.parameters())
    finally:
        gc.enable()


@pytest.mark.parametrize("draft_quantization", [None, "fp8"])
def test_a_closed_engine_holds_no_tensors_with_a_draft_model_and_lora(draft_quantization: Optional[str]) -> None:
    """Every tensor the engine reaches (target and draft KV pages and weights, an FP8 draft's lm_head
    copy, swap space, LoRA slots, sampling caches) is gone after close: a new attribute holding device
    memory fails this test."""
    path = str(tiny_model_cached("qwen2"))
    llm = LLM(path, device="cpu", dtype="float32", swap_space_gb=0.01, draft_model=path, spec_dynamic=False,
              enable_lora=True, draft_quantization=draft_quantization)
    assert llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert llm.engine.metrics.spec_num_draft_tokens > 0  # the draft ran
    draft = llm.engine.runner.draft
    assert draft is not None and draft.cache is not None
    draft_kv_ref = weakref.ref(draft.cache.layers[0][0])
    held = reachable_tensor_bytes(llm.engine)
    kv_bytes = llm.engine.runner.kv_cache.layers[0][0].untyped_storage().nbytes()
    assert sum(held.values()) > kv_bytes  # the walk reaches the pools
    llm.close()
    gc.collect()
    assert draft_kv_ref() is None
    assert all(p.is_meta for p in draft.model.parameters())
    assert reachable_tensor_bytes(llm.engine) == {}


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_of_a_draft_engine_with_cuda_graphs_comes_back() -> None:
    path = str(tiny_model_cached("llama"))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start, start_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    llm = LLM(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.85, draft_model=path,
              spec_dynamic=False)
    draft = llm.engine.runner.draft
    assert llm.engine.runner.graphs is not None and draft is not None and draft.graphs is not None
    assert llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert torch.cuda.memory_allocated() - start > 2**30
    llm.close()
    gc.collect()
    torch.cuda.synchronize()
    # The pools were > 100 GiB; the slack is for cuBLAS workspaces (one per stream, graph capture's included).
    assert torch.cuda.memory_allocated() - start < 256 * 2**20
    # The allocator's cache (graph pools included) went back to the device too: close ran empty_cache.
    assert torch.cuda.memory_reserved() - start_reserved < 256 * 2**20
