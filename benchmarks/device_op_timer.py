"""GPU time of the page copies and swaps that run before each step's forward (diagnostic for issue
#16's agent loop): they run on the step's stream (agentserve/cache/device_ops.py), so every request
in the step waits for them. CUDA events around ModelRunner.execute_device_ops, read once per
benchmark mode; on the CPU (no events) it counts pages only. The host's time inside the calls is
timed too (issuing the copies, waiting on copy-stream events or a staged-bytes bound): when it
exceeds the GPU time, the step's stream idles on the host, not on the copies. Also counted: the page
kernels (gathers and scatters) the ops launched, and the host's waits at the swap-out staging bound
(cache/swap_streams.py)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from agentserve.cache.device_ops import CopyBlocks, DeviceOp, PageStores, SwapInStart, head_group
from agentserve.cache.kv_cache import KVCache
from agentserve.cache.swap_streams import SwapStreams
from agentserve.worker.model_runner import ModelRunner


@dataclass
class WatchedStreams:
    """A swap stream pair seen by the timer, with its counters at the last take: each take reports what
    happened since (one take per agent-loop mode; the counters themselves run over the engine's life)."""
    streams: SwapStreams
    bound_waits: int
    bound_wait_ms: float
    paced_chunks: int = 0
    forced_chunks: int = 0


class DeviceOpTimer:
    def __init__(self) -> None:
        # Per op kind (the groups execute_device_ops runs: device_ops.head_group): events.
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.pages: Counter[str] = Counter()
        self.host_ms: Counter[str] = Counter()
        self.page_kernels = 0  # gathers and scatters launched by the ops
        # The swap streams seen (by id), with their counters at the last take.
        self._streams: dict[int, WatchedStreams] = {}
        # The host's ms inside each part of the ops (index uploads, page kernels, copy-stream calls): which
        # part makes a swap cost ~1-2 ms of host time.
        self.part_ms: Counter[str] = Counter()
        self._allocator = _allocator_counts()

    def _watch_streams(self, runner: ModelRunner) -> None:
        stores = runner.pages.stores if isinstance(runner.pages, PageStores) else [runner.pages]
        for store in stores:
            streams = store.swap_streams if isinstance(store, KVCache) else None
            if streams is not None and id(streams) not in self._streams:
                self._streams[id(streams)] = WatchedStreams(streams, streams.bound_waits, streams.bound_wait_ms)

    def install(self) -> Callable[[], None]:
        """Wraps ModelRunner.execute_device_ops and KVCache's page moves; returns the undo."""
        original = ModelRunner.execute_device_ops
        gather, scatter = KVCache.gather, KVCache.scatter
        timer = self

        def counted_gather(cache: KVCache, index: Any) -> Any:
            timer.page_kernels += 1
            t0 = time.perf_counter()
            out = gather(cache, index)
            timer.part_ms["gather"] += (time.perf_counter() - t0) * 1e3
            return out

        def counted_scatter(cache: KVCache, index: Any, pages: Any) -> None:
            timer.page_kernels += 1
            t0 = time.perf_counter()
            scatter(cache, index, pages)
            timer.part_ms["scatter"] += (time.perf_counter() - t0) * 1e3

        def timed_part(owner: Any, name: str) -> Callable[[], None]:
            original_part = getattr(owner, name)

            def part(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return original_part(*args, **kwargs)
                finally:
                    timer.part_ms[name] += (time.perf_counter() - t0) * 1e3
            setattr(owner, name, part)
            return lambda: setattr(owner, name, original_part)

        def timed(runner: ModelRunner, ops: list[DeviceOp]) -> None:
            timer._watch_streams(runner)
            for op in ops:  # counted first: execute_device_ops takes each op off the list as it runs
                timer.pages[type(op).__name__] += (1 if isinstance(op, CopyBlocks) else
                                                   len(op.slots) if isinstance(op, SwapInStart) else len(op.blocks))
            if not ops or not torch.cuda.is_available():
                return original(runner, ops)
            while ops:  # one kind at a time, each between its own events; taken off `ops` as the runner would
                n = head_group(ops)
                group, kind = ops[:n], type(ops[0]).__name__
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                original(runner, group)
                end.record()
                timer.host_ms[kind] += (time.perf_counter() - t0) * 1e3
                timer._events.append((kind, start, end))
                del ops[:n]

        ModelRunner.execute_device_ops = timed  # type: ignore[method-assign]
        KVCache.gather = counted_gather  # type: ignore[method-assign]
        KVCache.scatter = counted_scatter  # type: ignore[method-assign]
        undo_parts = [timed_part(KVCache, "_index"), timed_part(SwapStreams, "copy_out"),
                      timed_part(SwapStreams, "start_in"), timed_part(SwapStreams, "finish_in"),
                      timed_part(SwapStreams, "_bound_staged"), timed_part(SwapStreams, "step_launched")]

        def undo() -> None:
            ModelRunner.execute_device_ops = original  # type: ignore[method-assign]
            KVCache.gather, KVCache.scatter = gather, scatter  # type: ignore[method-assign]
            for undo_part in undo_parts:
                undo_part()
        return undo

    def take(self) -> dict[str, Any]:
        """GPU and host ms spent in the ops (in all, and per kind) and pages moved since the last take
        (synchronizes the device)."""
        if self._events:
            torch.cuda.synchronize()
        gpu: Counter[str] = Counter()
        for kind, s, e in self._events:
            gpu[kind] += s.elapsed_time(e)
        pages, host = dict(self.pages), dict(self.host_ms)
        self._events, self.pages, self.host_ms = [], Counter(), Counter()
        # Since the last take: waits at the staging bound, and the pacer's swap-in chunks
        # (cache/swap_in_pacer.py: handed out after steps' uploads, or forced by a finish or a swap out).
        waits, wait_ms, paced_chunks, forced_chunks = 0, 0.0, 0, 0
        for w in self._streams.values():
            streams, pacer = w.streams, w.streams.pacer
            waits += streams.bound_waits - w.bound_waits
            wait_ms += streams.bound_wait_ms - w.bound_wait_ms
            paced_chunks += pacer.paced_chunks - w.paced_chunks
            forced_chunks += pacer.forced_chunks - w.forced_chunks
            w.bound_waits, w.bound_wait_ms = streams.bound_waits, streams.bound_wait_ms
            w.paced_chunks, w.forced_chunks = pacer.paced_chunks, pacer.forced_chunks
        paced = {"paced_chunks": paced_chunks, "forced_chunks": forced_chunks,  # and the pacer's measured rate
                 "gb_s": [round(w.streams.pacer.bytes_per_s / 1e9, 1) for w in self._streams.values()]}
        kernels, self.page_kernels = self.page_kernels, 0
        parts, self.part_ms = dict(self.part_ms), Counter()
        allocator = _allocator_counts()
        allocator_delta = {k: allocator[k] - self._allocator.get(k, 0) for k in allocator}
        self._allocator = allocator
        return {"device_op_host_ms_by_part": parts, "allocator_counts": allocator_delta,
                "device_ops_gpu_ms": sum(gpu.values()), "device_ops_host_ms": sum(host.values()),
                "device_op_pages": pages, "device_op_gpu_ms_by_kind": dict(gpu), "device_op_host_ms_by_kind": host,
                "page_kernels": kernels, "staging_bound_waits": waits, "staging_bound_wait_ms": wait_ms,
                "swap_in_pacing": paced}


def _allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's counters whose growth means host stalls: cudaMalloc retries after
    freeing the cache (each synchronizes the device), device mallocs and frees (cudaFree synchronizes)."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                              "num_sync_all_streams", "num_ooms")}
