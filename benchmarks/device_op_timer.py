"""GPU time of the page copies and swaps that run before each step's forward (diagnostic for issue
#16's agent loop): they run on the step's stream (agentserve/cache/device_ops.py), so every request
in the step waits for them. CUDA events around ModelRunner.execute_device_ops, read once per
benchmark mode; on the CPU (no events) it counts pages only. The host's time inside the calls is
timed too (issuing the copies, waiting on copy-stream events or a staged-bytes bound): when it
exceeds the GPU time, the step's stream idles on the host, not on the copies."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

import torch

from agentserve.cache.device_ops import CopyBlocks, DeviceOp, SwapInStart
from agentserve.worker.model_runner import ModelRunner


class DeviceOpTimer:
    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.pages: Counter[str] = Counter()
        self.host_ms = 0.0

    def install(self) -> Callable[[], None]:
        """Wraps ModelRunner.execute_device_ops; returns the undo."""
        original = ModelRunner.execute_device_ops
        timer = self

        def timed(runner: ModelRunner, ops: list[DeviceOp]) -> None:
            for op in ops:  # counted first: execute_device_ops takes each op off the list as it runs
                timer.pages[type(op).__name__] += (1 if isinstance(op, CopyBlocks) else
                                                   len(op.slots) if isinstance(op, SwapInStart) else len(op.blocks))
            if not ops or not torch.cuda.is_available():
                return original(runner, ops)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            original(runner, ops)
            end.record()
            timer.host_ms += (time.perf_counter() - t0) * 1e3
            timer._events.append((start, end))

        ModelRunner.execute_device_ops = timed  # type: ignore[method-assign]
        return lambda: setattr(ModelRunner, "execute_device_ops", original)

    def take(self) -> dict[str, Any]:
        """GPU and host ms spent in the ops and pages moved since the last take (synchronizes the device)."""
        if self._events:
            torch.cuda.synchronize()
        ms = sum(s.elapsed_time(e) for s, e in self._events)
        pages, self._events, self.pages = dict(self.pages), [], Counter()
        host_ms, self.host_ms = self.host_ms, 0.0
        return {"device_ops_gpu_ms": ms, "device_ops_host_ms": host_ms, "device_op_pages": pages}
