"""GPU: the kernel copy from pinned host memory (kernels/host_copy.py) and why swap ins use it (run with
`pytest -m gpu`): every byte of a 64 MiB interior slice of a pinned buffer arrives, and a step's small
upload on another stream completes while a swap in by the kernel is still on its way (the copy engine,
which serves all streams' uploads in order, is left to the step)."""

from __future__ import annotations

import pytest
import torch

from agentserve.cache import swap_streams as swap_streams_module
from agentserve.cache.swap_streams import SwapStreams
from agentserve.kernels import host_copy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_pinned_slice_arrives_exact() -> None:
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(-2**31, 2**31 - 1, ((64 << 20) // 4 + 1000,), dtype=torch.int32, generator=g).pin_memory()
    src = raw[777:777 + (64 << 20) // 4].view(torch.uint8).view(torch.bfloat16)
    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda")
    host_copy.copy_from_host(dst, src)
    assert torch.equal(dst.cpu().view(torch.int32), raw[777:777 + (64 << 20) // 4])


def test_a_step_upload_does_not_wait_for_a_swap_in_by_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swap_streams_module, "SWAP_IN_COPY", "kernel")
    streams = SwapStreams(torch.device("cuda"))
    slots = torch.ones((1 << 30) // 4, dtype=torch.int32).pin_memory()  # ~20 ms of PCIe
    step_src = torch.arange(4096, dtype=torch.int32).pin_memory()
    step_dst = torch.empty(4096, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    staged, swap_done = streams.start_in([(slots, range(0, 1))])
    step_dst.copy_(step_src, non_blocking=True)  # the step's stream
    uploaded = torch.cuda.Event()
    uploaded.record()
    uploaded.synchronize()
    assert not swap_done.query(), "the step's upload waited for the swap in's copy"
    streams.finish_in(staged, swap_done)
    assert torch.equal(step_dst.cpu(), step_src)
    assert int(staged.sum().item()) == slots.numel()
