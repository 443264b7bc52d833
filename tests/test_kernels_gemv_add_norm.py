"""The row-parallel GEMV with the residual add and RMSNorm in its epilogue (kernels/gemv_add_norm.py)
against the two steps it replaces (F.linear or the FP8 reference, then rms_norm_ref) in Triton's
interpreter: one and two rows, K a multiple of the tile or not, a partial last block of outputs, bias,
16-bit and e4m3 weights, tickets back at zero after every launch; and the dispatch
(model/add_norm.project_add_norm) on both quant methods, with the cases that must not fuse."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import gemv_add_norm  # noqa: E402
from agentserve.kernels.fp8_linear import fp8_linear_ref, quantize_weight_per_channel  # noqa: E402
from agentserve.kernels.gemv import GemvConfig  # noqa: E402
from agentserve.kernels.rmsnorm import rms_norm_ref  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(gemv_add_norm._gemv_add_norm_kernel)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    residual = torch.randn(m, n, generator=g).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    return x, weight, residual, norm_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,block_k", [(256, 64), (200, 64)])  # even and ragged K
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear_then_add_rms_norm(dtype: torch.dtype, m: int, k: int, block_k: int, with_bias: bool) -> None:
    n = 37  # a partial last block of 4 outputs; 10 programs per row draw tickets
    x, weight, residual, norm_weight = _inputs(m, n, k, dtype, seed=m * 100 + k)
    bias = torch.randn(n).to(dtype) if with_bias else None
    workspace = gemv_add_norm.AddNormWorkspace(n, x.device)
    x_before, res_before = x.clone(), residual.clone()
    out, new_res = gemv_add_norm.gemv_add_rms_norm_triton(x, weight, GemvConfig("fma", 4, block_k), residual,
                                                          norm_weight, 1e-5, workspace, bias=bias)
    want_out, want_res = rms_norm_ref(F.linear(x, weight, bias), norm_weight, 1e-5, residual)
    assert out.dtype == new_res.dtype == dtype and out.shape == new_res.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(new_res.float(), want_res.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol)
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)  # inputs untouched
    assert workspace.tickets.eq(0).all()  # reset by each row's last program


def test_fp8_weights_with_channel_scales_repeated_launches() -> None:
    """e4m3 weights with per-row scales; the same workspace over several launches (as graph replays
    reuse it): each launch is right, so the tickets were back at zero each time."""
    n, k = 48, 256
    g = torch.Generator().manual_seed(7)
    weight_q, scale = quantize_weight_per_channel(torch.randn(n, k, generator=g) / k ** 0.5)
    norm_weight = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.float16)
    workspace = gemv_add_norm.AddNormWorkspace(n, torch.device("cpu"))
    for step in range(3):
        x = torch.randn(2, 1, k, generator=g).to(torch.float16)
        residual = torch.randn(2, 1, n, generator=g).to(torch.float16)
        out, new_res = gemv_add_norm.gemv_add_rms_norm_triton(x, weight_q, GemvConfig("fma", 8, 128), residual,
                                                              norm_weight, 1e-6, workspace, weight_scale=scale)
        want_out, want_res = rms_norm_ref(fp8_linear_ref(x, weight_q, scale), norm_weight, 1e-6, residual)
        assert out.shape == new_res.shape == (2, 1, n), step
        torch.testing.assert_close(new_res.float(), want_res.float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-3, atol=2e-3)


def test_refuses_what_it_cannot_fuse() -> None:
    x, weight, residual, norm_weight = _inputs(1, 8, 64, torch.float32, seed=1)
    workspace = gemv_add_norm.AddNormWorkspace(8, x.device)
    with pytest.raises(ValueError, match="an fma tile"):
        gemv_add_norm.gemv_add_rms_norm_triton(x, weight, GemvConfig("dot", 16, 64), residual, norm_weight, 1e-5,
                                               workspace)
    with pytest.raises(ValueError, match="residual"):
        gemv_add_norm.gemv_add_rms_norm_triton(x, weight, GemvConfig("fma", 4, 64), residual.repeat(2, 1),
                                               norm_weight, 1e-5, workspace)


def _row_parallel_and_norm(n: int, k: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from agentserve.model.layers import RMSNorm
    from agentserve.model.linear import RowParallelLinear

    torch.manual_seed(0)
    proj, norm = RowParallelLinear(k, n, bias=True), RMSNorm(n, 1e-5)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(n, k) / k ** 0.5)
        assert proj.bias is not None
        proj.bias.copy_(torch.randn(n))
        norm.weight.copy_(1 + 0.1 * torch.randn(n))
    return proj, norm


def test_project_add_norm_fuses_where_the_gemv_would_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unquantized method fuses where use_triton_gemv says its GEMV runs (CUDA M == 1; forced here),
    else the two steps; the flag off never fuses, and a projection whose sum follows an all-reduce
    (tensor parallelism) never does."""
    from agentserve.model import add_norm, quant

    proj, norm = _row_parallel_and_norm(40, 64)
    x, residual = torch.randn(1, 64), torch.randn(1, 40)
    want = norm(proj(x), residual)
    calls = count_calls(monkeypatch, quant, "gemv_add_rms_norm_triton")
    torch.testing.assert_close(add_norm.project_add_norm(proj, x, residual, norm), want)  # CPU: two steps
    assert calls[0] == 0
    monkeypatch.setattr(quant, "use_triton_gemv", lambda x, w: True)
    got = add_norm.project_add_norm(proj, x, residual, norm)
    assert calls[0] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(add_norm, "FUSED_ADD_NORM_GEMV", False)
    add_norm.project_add_norm(proj, x, residual, norm)
    monkeypatch.setattr(add_norm, "FUSED_ADD_NORM_GEMV", True)
    proj.all_reduce = lambda t: t  # as a tensor-parallel rank's layer holds one
    add_norm.project_add_norm(proj, x, residual, norm)
    assert calls[0] == 1


def test_project_add_norm_with_fp8_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentserve.model import add_norm, fp8 as fp8_model
    from agentserve.model.quant_config import ONLINE_FP8

    proj, norm = _row_parallel_and_norm(40, 64)
    proj.half(), norm.half()
    proj.quant_method = fp8_model.Fp8LinearMethod(ONLINE_FP8)  # quantizes the 16-bit weight it holds
    proj.quant_method.process_weights_after_loading(proj)
    x, residual = torch.randn(2, 64).half(), torch.randn(2, 40).half()
    want = norm(proj(x), residual)
    calls = count_calls(monkeypatch, fp8_model, "gemv_add_rms_norm_triton")
    monkeypatch.setattr(fp8_model, "use_fp8_gemv", lambda x, input_scale: True)
    got = add_norm.project_add_norm(proj, x, residual, norm)
    assert calls[0] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-3, atol=2e-3)
