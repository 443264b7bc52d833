"""FP8 (e4m3) linear layers: y[M, N] = x[M, K] @ (W_q[N, K] * w_scale[N, None])^T (+ bias).

Weights are stored as float8_e4m3fn with one fp32 scale per output channel (what every FP8
checkpoint format reduces to here: per-tensor and 128x128-block scales are converted at load,
see agentserve/model/fp8.py). Three ways to apply them:

- `fp8_gemv_triton` (M <= GEMV_MAX_M on CUDA: batch 1, a draft's 2-token catch-up): one read of the
  fp8 weights, dequantized in registers and multiplied with the 16-bit activations (W8A16: the
  activation is not quantized, so batch 1 loses nothing to activation rounding), fp32 accumulation,
  the channel scale applied once per output. At batch 1 a decode step is bound by the bytes of weights
  it reads; fp8 halves them. Its tiles per shape and M: kernels/fp8_gemv_tiles.py.
- `fp8_scaled_mm` (larger batches on CUDA): activations quantized per token to e4m3 (dynamic
  scales, `quantize_per_token`, a Triton kernel) or with the checkpoint's static per-tensor input
  scale, then `torch._scaled_mm` with rowwise scales (cuBLASLt / CUTLASS on Hopper): W8A8 on the
  fp8 tensor cores.
- `fp8_linear_ref` (CPU, and the tests' reference): dequantize, then matmul in the activation
  dtype. With a static input scale it also rounds the activations as the checkpoint prescribes;
  `set_cpu_activation_quant(True)` makes it emulate the dynamic per-token W8A8 path as well
  (accuracy measurements of what the GPU's larger batches compute).

Dispatch (`fp8_linear`): decisions read shapes, dtypes and module globals only (no host syncs,
no allocations beyond outputs and the quantized activations), so the calls can be captured in
CUDA graphs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .fp8_gemv_tiles import device_name_of, fp8_gemv_config
from ._triton_utils import cdiv, next_pow2, num_sms, pdl_begin, pdl_launch, tl, triton, triton_enabled_for
from .fp8_utils import FP8_DTYPE, FP8_MAX, per_token_scale, scaled_to_fp8_range, to_fp8_saturated
from .gemv import GemvConfig, as_rows, fma_program_rows, weights_before_wait

# Smallest per-token / per-channel scale: keeps all-zero rows finite (0 / tiny = 0).
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
# Largest M that takes the FP8 GEMV (above it: _scaled_mm). AGENTSERVE_FP8_GEMV_MAX_M overrides it
# for the GPU benchmark's A/B runs; the GEMV kernel itself handles any M up to GEMV_LIMIT_M. 2: an
# FP8 draft's catch-up after every verification is a 2-token forward (spec/continuation.py), which
# through _scaled_mm cost ~0.5 ms more per speculative iteration on the H200 than a 1-token step
# (64 W8A8 GEMMs at ~13 us plus their per-token activation quantization, against ~8 us GEMVs).
GEMV_LIMIT_M = 4
GEMV_MAX_M: int = min(GEMV_LIMIT_M, int(os.environ.get("AGENTSERVE_FP8_GEMV_MAX_M", "2")))
_cpu_activation_quant = False


def set_cpu_activation_quant(enabled: bool) -> None:
    """Whether the CPU reference also rounds activations per token to e4m3 (the GPU's W8A8 path for
    larger batches) instead of leaving them unquantized (the GPU's batch-1 GEMV)."""
    global _cpu_activation_quant
    _cpu_activation_quant = enabled


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (W_q e4m3 [N, K], scale fp32 [N]) with W ~= W_q * scale[:, None].
    Each row's largest magnitude maps to 448, the top of e4m3's range."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8_saturated(w / scale[:, None]), scale


def dequantize_weight(weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from e4m3 weights and per-channel scales."""
    return weight_q.float() * weight_scale.float()[:, None]


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q e4m3 [M, K], scale fp32 [M, 1]): each row's absmax maps to 448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8_saturated(xf / scale), scale


def quantize_static_ref(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded to e4m3 with a checkpoint's per-tensor input scale."""
    return to_fp8_saturated(x.float() / input_scale.float())


def fp8_linear_ref(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None,
                   quantize_input: bool = False) -> torch.Tensor:
    """Dequantize, then matmul in x's dtype. The activations are rounded to e4m3 first when the
    checkpoint has a static input scale, or per token when `quantize_input` (W8A8 emulation)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if input_scale is not None:
        x2 = (quantize_static_ref(x2, input_scale).float() * input_scale.float()).to(x.dtype)
    elif quantize_input:
        xq, xs = quantize_per_token_ref(x2)
        x2 = (xq.float() * xs).to(x.dtype)
    w = dequantize_weight(weight_q, weight_scale).to(x.dtype)
    return F.linear(x2, w, bias).reshape(*lead, weight_q.shape[0])


# ---------------------------------------------------------------------------------------------
# Per-token activation quantization (one program per row: absmax pass, then the quantizing pass;
# the row is a few KB and stays in L1/L2 between the two passes)
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M"])
def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                            FP8MAX: tl.constexpr, MINSCALE: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = per_token_scale(tl.max(amax, 0), FP8MAX, MINSCALE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        y = scaled_to_fp8_range(x, scale, FP8MAX)
        tl.store(q_ptr + row * stride_qm + k0 + offs, y.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as quantize_per_token_ref for x [M, K] with a contiguous last dim."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scale
    block_k = min(4096, max(16, next_pow2(k)))
    _quant_per_token_kernel[(m,)](x, xq, scale, m, k, x.stride(0), xq.stride(0),
                                  FP8MAX=FP8_MAX, MINSCALE=MIN_SCALE, BLOCK_K=block_k,
                                  num_warps=4 if block_k >= 1024 else 1, **pdl_launch(x))
    return xq, scale


# ---------------------------------------------------------------------------------------------
# FP8-weight GEMV (W8A16): the 16-bit GEMV's "fma" kernel with fp8 weight tiles
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr = False, W_FIRST: tl.constexpr = False,
):
    """Grid: (M * cdiv(N, BLOCK_N),); the M programs of one weight block are adjacent (the 2nd..Mth
    read of the block hits L2). Out-of-range rows are clamped, not masked: unmasked vector loads."""
    m, offs_n, rows, acc_rows = fma_program_rows(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, BLOCK_N, BLOCK_K,
                                                 EVEN_K, USE_PDL, W_FIRST)
    # The channel scale is constant along K: applied once to the sum, not to every weight.
    y = acc_rows * tl.load(ws_ptr + rows)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def fp8_gemv_triton(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, config: Optional[GemvConfig] = None) -> torch.Tensor:
    """fp8_linear_ref's contract (no input scale) for x [..., K] with prod(leading dims) <= GEMV_LIMIT_M.
    `config` (an "fma" GemvConfig) overrides the tiles (tests, benchmarks/fp8.py's sweep)."""
    n, k = weight_q.shape
    lead = x.shape[:-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    if m > GEMV_LIMIT_M or weight_q.stride(-1) != 1 or weight_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 gemv: x {tuple(x.shape)} weight {tuple(weight_q.shape)} {weight_q.dtype} "
                         f"(M <= {GEMV_LIMIT_M}, contiguous e4m3 rows)")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    cfg = config or fp8_gemv_config(n, k, num_sms(x.device) if x.is_cuda else 132, m,
                                     device_name=device_name_of(x.device))
    b = bias.contiguous() if bias is not None else weight_scale
    _fp8_gemv_kernel[(m * cdiv(n, cfg.block_n),)](
        x2, weight_q, weight_scale, b, out, m, n, k, x2.stride(0), weight_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        W_FIRST=weights_before_wait(weight_q), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x2))
    return out.view(*lead, n)


# ---------------------------------------------------------------------------------------------
# W8A8 through torch._scaled_mm, and the dispatcher
# ---------------------------------------------------------------------------------------------

def fp8_scaled_mm_ref(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What fp8_scaled_mm computes, in fp32 on any device (GPU tests' reference)."""
    return fp8_linear_ref(x.float(), weight_q, weight_scale, None if bias is None else bias.float(),
                          input_scale, quantize_input=True).to(x.dtype)


def scaled_mm_supported(k: int, n: int) -> bool:
    # cuBLASLt's fp8 GEMM needs both dimensions of the weight to be multiples of 16.
    return k % 16 == 0 and n % 16 == 0


def fp8_scaled_mm(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 on the fp8 tensor cores: x quantized per token (or with the static input scale), then
    one rowwise-scaled GEMM. weight_scale must be fp32 [N]; the output is x's dtype."""
    n, k = weight_q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:  # cuBLASLt refuses empty operands
        return x.new_empty(*lead, n)
    if input_scale is not None:
        xq = quantize_static_ref(x2, input_scale)
        xs = input_scale.float().reshape(1, 1).expand(m, 1).contiguous()
    elif triton_enabled_for(x2):
        xq, xs = quantize_per_token_triton(x2)
    else:
        xq, xs = quantize_per_token_ref(x2)
    # Rowwise scaling produces bf16 only; fp16 models convert the result (one cheap elementwise pass).
    y = torch._scaled_mm(xq, weight_q.t(), scale_a=xs, scale_b=weight_scale.view(1, n), out_dtype=torch.bfloat16)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)


def use_fp8_gemv(x: torch.Tensor, input_scale: Optional[torch.Tensor]) -> bool:
    """Whether fp8_linear takes the FP8 GEMV for `x`: CUDA 16-bit activations quantized dynamically
    (no static input scale), at most GEMV_MAX_M rows. Python-only (shapes, dtypes): graph-capture safe."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and input_scale is None
            and 0 < m <= GEMV_MAX_M and triton_enabled_for(x))


def fp8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CUDA 16-bit activations: the FP8 GEMV for M <= GEMV_MAX_M (dynamic activations only), else
    _scaled_mm (falling back to the reference for shapes cuBLASLt refuses). Elsewhere: the reference."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return fp8_linear_ref(x, weight_q, weight_scale, bias, input_scale, quantize_input=_cpu_activation_quant)
    if use_fp8_gemv(x, input_scale):
        return fp8_gemv_triton(x, weight_q, weight_scale, bias)
    if scaled_mm_supported(*weight_q.shape[::-1]):
        return fp8_scaled_mm(x, weight_q, weight_scale, bias, input_scale)
    return fp8_linear_ref(x, weight_q, weight_scale, bias, input_scale)
