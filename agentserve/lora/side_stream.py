"""The LoRA shrink on a second CUDA stream, beside the base projection (decode-sized steps).

A decode step with an adapter runs, per LoRA projection, the base GEMV (bound by reading the weights)
then the shrink (h = x @ A^T) then the expand (y += h @ B^T). At batch 1 the two LoRA kernels are
each a few microseconds of launch latency and little work: one stream with a rank-16 q/k/v/o adapter
was 0.89x the base on the H200 (204.1 vs 229.2 tok/s: +0.54 ms for 128 LoRA kernels per step). The
shrink reads only x and A, so it does not have to wait for the base GEMV: here it runs on a side
stream, forked after x is ready and joined before the expand, which is the only kernel that needs
both (it adds into the GEMV's output). In a CUDA graph the fork and join become graph edges, so the
shrink's latency hides under the weight stream. The outputs are bitwise those of the serial order
(the same kernels on the same inputs).

The shrink and the expand launch without programmatic dependent launch here: the shrink's
predecessor on its stream is an event, and the expand follows a join of two streams.

Opt-in (AGENTSERVE_LORA_SIDE_STREAM=1) until the H200 A/B (benchmarks/lora.py one stream) decides.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from agentserve.kernels._triton_utils import triton_enabled_for
from agentserve.kernels.lora import LoRABatchMeta, lora_expand, lora_shrink, lora_shrink_buffer
from agentserve.kernels.lora_fused import use_fused_lora

LORA_SIDE_STREAM: bool = os.environ.get("AGENTSERVE_LORA_SIDE_STREAM", "0") == "1"
# Steps of at most this many tokens (decode graphs): above it the base GEMM fills the GPU by itself.
SIDE_STREAM_MAX_TOKENS = 16

_side_streams: dict[int, torch.cuda.Stream] = {}


def use_side_stream(x: torch.Tensor, meta: LoRABatchMeta) -> bool:
    """Python-only decision (graph-capture safe): the flag, a CUDA step of decode size, and the
    two-kernel LoRA path (the fused kernel has no separate shrink)."""
    return (LORA_SIDE_STREAM and triton_enabled_for(x) and 0 < meta.num_tokens <= SIDE_STREAM_MAX_TOKENS
            and not use_fused_lora(meta.num_tokens))


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = _side_streams[index] = torch.cuda.Stream(device=index)
    return stream


def base_then_lora_overlapped(base_forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                              lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                              scaling: torch.Tensor, meta: LoRABatchMeta, slice_starts: torch.Tensor) -> torch.Tensor:
    """base_forward(x) + the LoRA delta, with the shrink on the side stream. `x` is contiguous.

    Memory: the shrink's buffer is allocated on the main stream before the fork, and the main
    stream waits for the side stream before anything after the expand, so neither x nor the buffer
    can be reused while the side stream still reads or writes them."""
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    shrunk = lora_shrink_buffer(x, lora_a, meta)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        lora_shrink(x, lora_a, ranks, meta, out=shrunk, pdl=False)
    y = base_forward(x)
    main.wait_stream(side)
    lora_expand(y, shrunk, lora_b, ranks, scaling, meta, slice_starts, pdl=False)
    return y

