"""A row-parallel projection's small-batch GEMV with the residual add and the next RMSNorm in its
epilogue: (out, new_residual) = rms_norm(x @ dequant(W)^T + bias, weight, eps, residual), one kernel
instead of the GEMV and a norm kernel.

At batch 1 an 8B decode step runs 65 RMSNorms, each a one-program kernel of ~3.7-3.9 us of device time
(its PDL wait included) that reads a row the GEMV before it just wrote. o_proj and down_proj feed the
two norms of every layer boundary, and their fma GEMV (kernels/gemv.py) gives each program BLOCK_N
whole outputs (no split-K), so the epilogue can add the residual, store that slice of the new residual
stream and its sum of squares. The norm needs the whole row's statistic, which only exists once every
program of the row is done: each program takes a ticket (an atomic counter per row) after its stores,
and the program that draws the last ticket sums the row's partials and writes the normalised row.
The partials are summed in a fixed order by that one program, so the statistic is deterministic (an
fp32 atomic sum would round differently run to run and could flip greedy near-ties). The last program
resets its row's counter, so the counters are zero again for the next launch and every graph replay.

The consumers (the qkv GEMV, gate_up + SiLU, the lm_head) are untouched: an earlier attempt that made
every consumer program recompute the statistic lost 9% (benchmarks/NOTES.md, ninth session).

Ordering: a program's threads store, meet at a barrier, then one thread's acq_rel atomic at GPU scope
releases the stores; the last program's atomic acquires them, and it reads the partials and the row
through L2 (".cg"), bypassing an L1 that could hold lines of this SM's earlier programs.

Rounding follows the two-step path: the projection's output rounded to the model dtype, the residual
sum rounded to it, the normalised row rounded before the weight multiply (kernels/rmsnorm.py); only
the statistic's fp32 summation order differs from the norm kernel's.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from ._triton_utils import cdiv, next_pow2, pdl_launch, tl, triton
from .gemv import GemvConfig, as_rows, fma_program_rows

# Rows a workspace holds: the largest M any GEMV path that fuses here runs (the FP8 GEMV's limit).
WORKSPACE_ROWS: int = 16


@triton.jit(do_not_specialize=["M"])
def _gemv_add_norm_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, res_ptr, nw_ptr, new_res_ptr, out_ptr, partial_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_nm, stride_om, eps,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCKS_POW2: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid: (M * cdiv(N, BLOCK_N),) as the fma GEMV's (the M programs of a weight block adjacent).
    partial_ptr: fp32 [M, cdiv(N, BLOCK_N)]; ticket_ptr: int32 [M], zero on entry and on exit."""
    m, offs_n, rows, y = fma_program_rows(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, BLOCK_N, BLOCK_K, EVEN_K,
                                          USE_PDL)
    if HAS_SCALE:
        y = y * tl.load(ws_ptr + rows)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    dt = new_res_ptr.dtype.element_ty
    n_mask = offs_n < N
    r = tl.load(res_ptr + m * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    s = (y.to(dt).to(tl.float32) + r).to(dt)
    tl.store(new_res_ptr + m * stride_nm + offs_n, s, mask=n_mask)
    sf = tl.where(n_mask, s.to(tl.float32), 0.0)
    num_blocks = tl.cdiv(N, BLOCK_N)
    tl.store(partial_ptr + m * num_blocks + (tl.program_id(0) // M), tl.sum(sf * sf, 0))
    tl.debug_barrier()  # every thread's stores issued before the ticket releases them
    ticket = tl.atomic_add(ticket_ptr + m, 1, sem="acq_rel", scope="gpu")
    if ticket == num_blocks - 1:  # the row's last program: every slice and partial is in
        tl.debug_barrier()
        offs_b = tl.arange(0, BLOCKS_POW2)
        partials = tl.load(partial_ptr + m * num_blocks + offs_b, mask=offs_b < num_blocks, other=0.0,
                           cache_modifier=".cg")
        rstd = tl.rsqrt(tl.sum(partials, 0) / N + eps)
        for h0 in range(0, N, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < N
            row = tl.load(new_res_ptr + m * stride_nm + offs_h, mask=h_mask, other=0.0, cache_modifier=".cg")
            w = tl.load(nw_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
            normed = (row.to(tl.float32) * rstd).to(dt).to(tl.float32)
            tl.store(out_ptr + m * stride_om + offs_h, (w * normed).to(out_ptr.dtype.element_ty), mask=h_mask)
        tl.store(ticket_ptr + m, 0)


class AddNormWorkspace:
    """One projection's partial sums and tickets. Per layer, not shared: two graphs replayed on two
    streams at once could otherwise interleave their tickets."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.partials = torch.empty(WORKSPACE_ROWS * n, dtype=torch.float32, device=device)  # BLOCK_N >= 1
        self.tickets = torch.zeros(WORKSPACE_ROWS, dtype=torch.int32, device=device)


_workspaces: "weakref.WeakKeyDictionary[torch.Tensor, AddNormWorkspace]" = weakref.WeakKeyDictionary()


def workspace_for(weight: torch.Tensor) -> Optional[AddNormWorkspace]:
    """The workspace of the projection owning `weight` (made on its first call). None while a CUDA graph
    is being captured and none exists yet: its zeroed tickets must not live in a graph's private pool
    (the runner's warm-up, which runs before capture, makes them)."""
    workspace = _workspaces.get(weight)
    if workspace is None and not (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
        workspace = _workspaces[weight] = AddNormWorkspace(weight.shape[0], weight.device)
    return workspace


def gemv_add_rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig, residual: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float, workspace: AddNormWorkspace,
                             weight_scale: Optional[torch.Tensor] = None,
                             bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_ref(x @ dequant(weight)^T + bias, norm_weight, eps, residual) for x [..., K] with at most
    WORKSPACE_ROWS rows; weight [N, K] (16-bit, or e4m3 with `weight_scale` fp32 [N]); residual [..., N]
    in the model dtype. Returns fresh (normed, new_residual); inputs are never modified."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    res2 = residual.reshape(-1, n)
    if (config.kind != "fma" or weight.stride(-1) != 1 or x.shape[-1] != k or m > WORKSPACE_ROWS
            or res2.shape[0] != m or norm_weight.shape != (n,)):
        raise ValueError(f"gemv_add_rms_norm: x {tuple(x.shape)} weight {tuple(weight.shape)} residual "
                         f"{tuple(residual.shape)} norm weight {tuple(norm_weight.shape)} config {config} "
                         f"(contiguous weight rows, an fma tile, at most {WORKSPACE_ROWS} rows)")
    if res2.stride(-1) != 1:
        res2 = res2.contiguous()
    model_dtype = torch.promote_types(x.dtype, residual.dtype)
    new_res = torch.empty((m, n), dtype=model_dtype, device=x.device)
    out = torch.empty((m, n), dtype=torch.promote_types(norm_weight.dtype, model_dtype), device=x.device)
    if m > 0 and n > 0:
        num_blocks = cdiv(n, config.block_n)
        _gemv_add_norm_kernel[(m * num_blocks,)](
            x2, weight, weight_scale if weight_scale is not None else x2, bias.contiguous() if bias is not None else x2,
            res2, norm_weight.contiguous(), new_res, out, workspace.partials, workspace.tickets,
            m, n, k, x2.stride(0), weight.stride(0), res2.stride(0), new_res.stride(0), out.stride(0), float(eps),
            HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0, BLOCKS_POW2=next_pow2(num_blocks),
            BLOCK_H=min(next_pow2(n), 2048), num_warps=config.num_warps, num_stages=config.num_stages,
            **pdl_launch(x2))
    return out.view(*lead, n), new_res.view(*lead, n)
