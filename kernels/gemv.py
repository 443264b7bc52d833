"""Skinny GEMM / GEMV for decode-time linear layers: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small.

At batch 1 a decode step is a stream of weight reads (15 GB for Llama-3.1-8B), so what matters is
the fraction of HBM bandwidth each projection reaches; cuBLAS picks GEMM tiles built for larger M.
Two kernels, both fp32-accumulating over bf16/fp16 (or fp32) weights in nn.Linear layout:

- "fma" (M <= FMA_MAX_M): one program = BLOCK_N weight rows x one row of x. It accumulates
  BLOCK_N x BLOCK_K fp32 partial products elementwise over the K loop and reduces across K once at
  the end (torch.compile's decode-GEMV shape), so the loop is loads + FMAs only. For M > 1 the
  programs of the M rows of x that share a weight block are adjacent in the grid: they run
  together and the 2nd..Mth read of the block hits L2, not HBM.
- "dot" (M <= 16): one program = BLOCK_N weight rows x all M rows (padded to 16), tl.dot on the
  tensor cores with the weight tiles streamed through the software pipeline (num_stages).

Neither splits K: BLOCK_N is chosen small enough that N / BLOCK_N fills the SMs a few times over
(a split-K partial buffer would cost another launch and another pass over [M, N]). Out-of-range
weight rows / x rows are clamped onto the last valid row instead of masked, so the hot loads stay
unmasked and vectorised (16-byte loads along K) whenever K is a multiple of BLOCK_K.

Dispatch (`linear`): AGENTSERVE_GEMV=auto (default) | torch | triton, or set_gemv_mode().
"triton" uses these kernels for every CUDA 16-bit call with M <= MAX_M; "auto" only where the
H100 benchmark (benchmarks/kernels.py, section "gemv", RESULTS.md 2026-11-23) found them faster
than cuBLAS: M == 1 (the tuned fma tiles beat cuBLAS on every Llama-3.1-8B projection, ~9% over a
step's linear layers; at M = 2..8 cuBLAS was as fast or faster). fp32 always goes to F.linear (exactness tests compare against it). Launch
decisions read shapes only: no host syncs, no allocations beyond the output, so the calls can be
captured in CUDA graphs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton_utils import cdiv, next_pow2, num_sms, pdl_begin, pdl_launch, tl, triton, triton_enabled_for

_MODES = ("torch", "triton", "auto")
_mode: str = os.environ.get("AGENTSERVE_GEMV", "auto")
if _mode not in _MODES:
    _mode = "auto"

MAX_M: int = 16          # largest M the kernels handle ("dot" pads M to 16)
AUTO_MAX_M: int = 1      # "auto" uses Triton up to this M (measured: see the module docstring)
FMA_MAX_M: int = 2       # "fma" up to this M, "dot" above (revisit with the GPU benchmark)
TARGET_PROGRAMS_PER_SM: int = 4
# fma_row_sums' W_FIRST (the first weight chunk loaded before the PDL wait) for FP8 weights: on (H200,
# eighteenth session: the FP8 8B layer's four GEMVs in a chain 63.1 -> 61.0 us, one stream 378.1 -> 382.8
# tok/s; AGENTSERVE_FP8_WEIGHTS_BEFORE_WAIT=0 turns it off). Never for 16-bit weights: measured slower twice
# (third session, -4.5% one stream; eighteenth, per size: 244.7 tok/s off, 242.9 on qkv and o, 239.6 on all).
FP8_WEIGHTS_BEFORE_WAIT: bool = os.environ.get("AGENTSERVE_FP8_WEIGHTS_BEFORE_WAIT", "1") == "1"


def weights_before_wait(weight: torch.Tensor) -> bool:
    """Whether an fma GEMV over `weight` loads its first weight chunk before the PDL wait (W_FIRST)."""
    return weight.element_size() == 1 and FP8_WEIGHTS_BEFORE_WAIT


def set_gemv_mode(mode: str) -> None:
    """"torch" (F.linear / cuBLAS), "triton" (these kernels for M <= MAX_M) or "auto"."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"unknown gemv mode {mode!r}; expected one of {_MODES}")
    _mode = mode


def get_gemv_mode() -> str:
    return _mode


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class GemvConfig:
    kind: str        # "fma" or "dot"
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


def gemv_config(m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """Heuristic tiles (H100). The fma tile holds BLOCK_N * BLOCK_K = 4096 fp32 partial sums
    (32 registers per thread at 4 warps); BLOCK_N shrinks until there are TARGET_PROGRAMS_PER_SM
    programs per SM, so enough loads are in flight per SM to cover HBM latency without split-K."""
    want = TARGET_PROGRAMS_PER_SM * sms
    # The tiles depend on the kernel kind only, not on M (and M is not a specialised argument):
    # every M of a kind runs one compiled kernel, which _precompile builds before graph capture.
    if m <= FMA_MAX_M and k % 2048 == 0:
        # Measured best on the H100 at M = 1 for every 8B projection (qkv, o, gate_up, lm_head:
        # 4 rows x 2048, 8 warps; the long-K down projection: 2 rows x 2048, 4 warps).
        if k >= 8192:
            return GemvConfig("fma", 2, 2048, num_warps=4, num_stages=1)
        if n >= 6144:
            # H200 (graph-timed over weight copies larger than the L2, benchmarks/fp8.py --parts gemv,
            # 2026-12-02): 4 rows x 1024 / 4 warps for the wide projections: qkv 14.0 vs 14.8 us,
            # gate_up 55.0 vs 57.6 us, the 128k lm_head 234.7 vs 240.8 us; o (N = 4096) stays.
            return GemvConfig("fma", 4, 1024, num_warps=4, num_stages=1)
        return GemvConfig("fma", 4, 2048, num_warps=8, num_stages=1)
    if m <= FMA_MAX_M and k % 512 == 0:
        return GemvConfig("fma", 16, 512, num_warps=8, num_stages=1)  # measured best for K = 3584
    if m <= FMA_MAX_M:
        block_n = 32
        while block_n > 2 and cdiv(n, block_n) < want:
            block_n //= 2
        block_k = min(max(64, next_pow2(k)), 4096 // block_n)
        return GemvConfig("fma", block_n, block_k, num_warps=4, num_stages=1)
    block_n = 128
    while block_n > 16 and cdiv(n, block_n) < want // 2:
        block_n //= 2
    block_k = 256 if block_n <= 32 else 128
    return GemvConfig("dot", block_n, min(block_k, max(16, next_pow2(k))), num_warps=4, num_stages=4)


@triton.jit
def _load_k_chunk(ptrs, offs_k, k0, K, EVEN_K: tl.constexpr, TILE: tl.constexpr):
    """The K chunk at k0 of a [rows, BLOCK_K] tile (TILE) or a [BLOCK_K] vector, zero past K unless EVEN_K."""
    if EVEN_K:
        chunk = tl.load(ptrs)
    else:
        k_mask = offs_k + k0 < K
        chunk = tl.load(ptrs, mask=k_mask[None, :] if TILE else k_mask, other=0.0)
    return chunk


@triton.jit
def fma_row_sums(w_ptrs, x_ptrs, offs_k, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_PDL: tl.constexpr, W_FIRST: tl.constexpr = False):
    """The fma kernels' K loop (16-bit and fp8 weight tiles): fp32 partial products of BLOCK_N rows
    accumulated elementwise, reduced once at the end. It also holds the PDL wait (kernels/_triton_utils.py):
    nothing before it in the calling kernel may load an earlier kernel's output or store. (Loading the
    first weight tile before the wait measured 4.5% slower on the H200, and issuing each chunk's loads
    before the previous chunk's math 7% slower: benchmarks/NOTES.md.)

    W_FIRST loads the first weight chunk before the wait (weights are never written by a step), so the
    program's first HBM read overlaps the previous kernel's tail; then the rest of the loop as usual,
    same sums in the same order. Which weights take it: weights_before_wait."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if W_FIRST:
        w_first = _load_k_chunk(w_ptrs, offs_k, 0, K, EVEN_K, True)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if W_FIRST:
        acc += w_first.to(tl.float32) * _load_k_chunk(x_ptrs, offs_k, 0, K, EVEN_K, False).to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    for k0 in range(BLOCK_K if W_FIRST else 0, K, BLOCK_K):
        w = _load_k_chunk(w_ptrs, offs_k, k0, K, EVEN_K, True)
        x = _load_k_chunk(x_ptrs, offs_k, k0, K, EVEN_K, False)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return tl.sum(acc, 1)


@triton.jit
def fma_program_rows(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, W_FIRST: tl.constexpr = False):
    """An fma GEMV program (grid (M * cdiv(N, BLOCK_N),); the M programs of one weight block are
    adjacent, so the 2nd..Mth read of it hits L2): its row m of x, its output rows, and their fp32
    sums. Out-of-range rows are clamped, not masked: the loads stay unmasked and vectorised."""
    pid = tl.program_id(0)
    m = (pid % M).to(tl.int64)
    nb = pid // M
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + m * stride_xm + offs_k
    return m, offs_n, rows, fma_row_sums(w_ptrs, x_ptrs, offs_k, K, BLOCK_N, BLOCK_K, EVEN_K, USE_PDL, W_FIRST)


# M is not specialised (Triton would otherwise compile M == 1 separately), so one binary serves
# every batch size of a CUDA-graph capture.
@triton.jit(do_not_specialize=["M"])
def _gemv_fma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (M * cdiv(N, BLOCK_N),); the M programs of one weight block are adjacent."""
    m, offs_n, rows, y = fma_program_rows(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, BLOCK_N, BLOCK_K, EVEN_K,
                                          USE_PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["M"])
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (cdiv(N, BLOCK_N),). acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] @ w[BLOCK_N, BLOCK_K]^T."""
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    nb = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_k_chunk(x_ptrs, offs_k, k0, K, EVEN_K, True)
        w = _load_k_chunk(w_ptrs, offs_k, k0, K, EVEN_K, True)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as [M, K] rows with a unit stride along K (a copy only where the layout needs one)."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                config: Optional[GemvConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as F.linear for x [..., K] with prod(leading dims) <= MAX_M; weight [N, K] with
    a contiguous last dim. `config` overrides the heuristic (tests, the benchmark's sweep)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    if m > MAX_M or x.shape[-1] != k:
        raise ValueError(f"gemv: x {tuple(x.shape)} weight {tuple(weight.shape)} (M must be <= {MAX_M})")
    if weight.stride(-1) != 1:
        raise ValueError("gemv: weight rows must be contiguous")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out.view(*lead, n)
    cfg = config or gemv_config(m, n, k, num_sms(x.device) if x.is_cuda else 132)
    has_bias = bias is not None
    b = bias.contiguous() if bias is not None else weight
    even_k = k % cfg.block_k == 0
    if cfg.kind == "fma":
        _gemv_fma_kernel[(m * cdiv(n, cfg.block_n),)](
            x2, weight, b, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=has_bias, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x2))
    else:
        _gemv_dot_kernel[(cdiv(n, cfg.block_n),)](
            x2, weight, b, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=has_bias, BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k,
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x2))
    return out.view(*lead, n)


_precompiled: set[tuple] = set()


def _precompile(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Compile and load both kernels for this weight shape on its first (uncaptured) call.

    The model runner warms up only batch 1 and its largest batch before capturing the decode
    graphs; the sizes in between (2, 4, 8) could otherwise reach a kernel kind never launched
    before, and Triton's compile and module load must not happen inside stream capture."""
    key = (weight.shape, weight.dtype, bias is not None, x.device)
    if key in _precompiled or torch.cuda.is_current_stream_capturing():
        return
    _precompiled.add(key)
    limit = MAX_M if _mode == "triton" else AUTO_MAX_M
    for m in sorted({1, min(FMA_MAX_M + 1, limit)}):
        gemv_triton(torch.zeros(m, weight.shape[1], dtype=x.dtype, device=x.device), weight, bias)


def use_triton_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Python-only decision (device type, dtype, shapes, a module global): graph-capture safe."""
    if _mode == "torch" or not triton_enabled_for(x):
        return False
    if weight.dtype not in (torch.float16, torch.bfloat16) or x.dtype != weight.dtype:
        return False
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < m <= (MAX_M if _mode == "triton" else AUTO_MAX_M) and weight.stride(-1) == 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, or the Triton GEMV for small-M 16-bit CUDA calls when the mode says so."""
    if use_triton_gemv(x, weight):
        _precompile(x, weight, bias)
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)
