"""Host-to-device copies done by a kernel reading pinned host memory, not by the copy engine.

The copy engine serves every stream's host-to-device copies in the order they were issued: a step's
small input uploads (token ids, positions, block tables; a few KB) issued while a 1 GiB session swap in
is on its way over PCIe on another stream wait for the whole swap (~20 ms), and the step's forward
with them (measured on an H100: a 13 ms step took 32-35 ms behind a 1 GiB swap-in copy, whole or in
pieces down to 8 MiB; a device-to-host copy in flight did not slow it; benchmarks/copy_contention.py).

Pinned host memory is mapped into the device's address space (unified addressing), so a kernel can
load from it directly over PCIe. `copy_from_host` moves a swap's bytes that way, with a bounded
number of programs, each looping over 16 KiB chunks: the copy engine stays free for the steps' own
copies, and the kernel's few resident warps mostly wait on PCIe reads beside the step's kernels.
"""

from __future__ import annotations

import torch

from ._triton_utils import cdiv, tl, triton

BLOCK_WORDS = 4096  # 16 KiB per program and iteration: 32 bytes per thread at 8 warps, 2 x 16-byte loads
DEFAULT_PROGRAMS = 64  # ~1 MiB of loads in flight: enough for PCIe's latency-bandwidth product (~50 GB/s)


@triton.jit
def _copy_words_kernel(dst_ptr, src_ptr, n_words, BLOCK: tl.constexpr):
    """dst[i] = src[i] for i < n_words, program p taking chunks p, p + P, p + 2P, ..."""
    pid = tl.program_id(0)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    for start in range(pid.to(tl.int64) * BLOCK, n_words, step):
        offs = start + lanes
        mask = offs < n_words
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def _words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as 32-bit words (its byte size must be a multiple of 4)."""
    return t.reshape(-1).view(torch.uint8).view(torch.int32)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor, programs: int = DEFAULT_PROGRAMS) -> None:
    """dst (device) gets src (pinned host, or any tensor the device can address) on the current stream;
    both contiguous, of the same dtype and size, a whole number of 32-bit words."""
    if dst.dtype != src.dtype or dst.numel() != src.numel():
        raise ValueError(f"copy_from_host: dst {tuple(dst.shape)} {dst.dtype} and src {tuple(src.shape)} {src.dtype} "
                         "must hold the same elements")
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("copy_from_host: dst and src must be contiguous")
    nbytes = dst.numel() * dst.element_size()
    if nbytes % 4:
        raise ValueError(f"copy_from_host: {nbytes} bytes is not a whole number of 32-bit words")
    n_words = nbytes // 4
    if n_words == 0:
        return
    grid = (max(1, min(programs, cdiv(n_words, BLOCK_WORDS))),)
    _copy_words_kernel[grid](_words(dst), _words(src), n_words, BLOCK=BLOCK_WORDS, num_warps=8)
