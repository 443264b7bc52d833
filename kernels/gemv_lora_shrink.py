"""One-token base GEMV with the LoRA shrink as extra output rows (AGENTSERVE_LORA_SHRINK_IN_GEMV=1;
opt-in until the H200's one-stream A/B decides).

At one token an adapter projection is three launches: the base GEMV over W [N, K], the shrink
h = x @ A_slot^T over the slot's A rows [num_slices * max_rank, K], and the expand. The shrink reads
the same x and is a GEMV itself, so this kernel's grid runs the base GEMV's programs (the fma tiles
of kernels/gemv.py) followed by ceil(num_slices * max_rank / BLOCK_N) programs over the token's
slot's A rows, which write the fp32 shrink in lora_shrink's layout [1, num_slices, 1, max_rank] for
lora_expand (kernels/lora.py). One launch less per adapter projection: 64 per decode step of an 8B
with q/k/v/o adapters, ~4 us each on the H200 (benchmarks/NOTES.md). A base-only token (slot -1)
leaves h unwritten: the expand skips base tokens.

The slot is read from the runner's persistent token_slots buffer on the device, so the launch
reads shapes only and is captured in the decode CUDA graphs like the GEMV it replaces.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import cdiv, num_sms, pdl_begin, pdl_launch, tl, triton
from .gemv import fma_program_rows, fma_row_sums, gemv_config, use_triton_gemv

SHRINK_IN_GEMV: bool = os.environ.get("AGENTSERVE_LORA_SHRINK_IN_GEMV", "0") == "1"


@triton.jit
def _gemv_lora_shrink_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, a_ptr, h_ptr, slots_ptr, N, K, NUM_A_ROWS, stride_wn, stride_a_slot,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N) + cdiv(NUM_A_ROWS, BLOCK_N),): base rows first, then A rows."""
    # The protocol's wait comes first here (not inside fma_row_sums): the A programs load the slot,
    # which the step's input copy wrote.
    pdl_begin(USE_PDL)
    pid = tl.program_id(0)
    base_blocks = tl.cdiv(N, BLOCK_N)
    if pid < base_blocks:
        # The base GEMV's program as kernels/gemv.py runs it (M = 1: program pid = weight block pid).
        _, offs_n, rows, y = fma_program_rows(x_ptr, w_ptr, 1, N, K, 0, stride_wn, BLOCK_N, BLOCK_K, EVEN_K, False)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        slot = tl.load(slots_ptr).to(tl.int64)
        if slot >= 0:
            offs_k = tl.arange(0, BLOCK_K)
            offs_j = (pid - base_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            rows = tl.minimum(offs_j, NUM_A_ROWS - 1).to(tl.int64)
            a_rows = a_ptr + slot * stride_a_slot + rows[:, None] * K + offs_k[None, :]
            h = fma_row_sums(a_rows, x_ptr + offs_k, offs_k, K, BLOCK_N, BLOCK_K, EVEN_K, False)
            tl.store(h_ptr + offs_j, h, mask=offs_j < NUM_A_ROWS)


def use_shrink_in_gemv(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """The flag, one token, the base projection on the 16-bit Triton GEMV's fma tiles (whose tile
    the A rows share: same K), and A in the weight's dtype with contiguous rows. Shapes only."""
    if not SHRINK_IN_GEMV or x.dim() != 2 or x.shape[0] != 1 or not use_triton_gemv(x, weight):
        return False
    n, k = weight.shape
    return (gemv_config(1, n, k).kind == "fma" and lora_a.dtype == weight.dtype and lora_a.is_contiguous()
            and lora_a.shape[-1] == k)


def gemv_with_lora_shrink(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_a: torch.Tensor, token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, K] @ weight[N, K]^T (+ bias) -> y [1, N] in x's dtype, and the shrink of the token's slot
    h [1, num_slices, 1, max_rank] fp32 (lora_a: [max_loras, num_slices, max_rank, K]; token_slots:
    [1] int32 on the device, -1 = base only, h then left unwritten)."""
    n, k = weight.shape
    if x.shape != (1, k) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv_with_lora_shrink: x {tuple(x.shape)} must be one contiguous row of K = {k}")
    max_loras, num_slices, max_rank, k_a = lora_a.shape
    if k_a != k or not lora_a.is_contiguous() or token_slots.shape != (1,):
        raise ValueError(f"gemv_with_lora_shrink: A {tuple(lora_a.shape)} must be contiguous with K = {k}, "
                         f"token_slots {tuple(token_slots.shape)} must be [1]")
    cfg = gemv_config(1, n, k, num_sms(x.device) if x.is_cuda else 132)
    if cfg.kind != "fma":
        raise ValueError(f"gemv_with_lora_shrink: K = {k} takes the dot GEMV tiles, not fma")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    h = torch.empty((1, num_slices, 1, max_rank), dtype=torch.float32, device=x.device)
    num_a_rows = num_slices * max_rank
    has_bias = bias is not None
    _gemv_lora_shrink_kernel[(cdiv(n, cfg.block_n) + cdiv(num_a_rows, cfg.block_n),)](
        x, weight, bias.contiguous() if has_bias else weight, y, lora_a, h, token_slots, n, k, num_a_rows,
        weight.stride(0), lora_a.stride(0), HAS_BIAS=has_bias, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x))
    return y, h
