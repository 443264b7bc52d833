"""kernels/fp8_halves.py: the FP8 GEMVs' K loop with each thread's 16 weights split into halves of 8. Its
tiles (every warp along K), the switch, and its sums in Triton's interpreter against the reference and
the plain loop, for the GEMV and the gate_up + SiLU twin (the compiled loop's lack of barriers:
tests/test_kernels_compile_sm90.py)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import fp8_halves, gemv, gemv_silu  # noqa: E402
from agentserve.kernels import fp8_linear as fl  # noqa: E402
from agentserve.kernels.fp8_gemv_tiles import halves_config, uses_halves  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(fl._fp8_gemv_kernel)


def _random_linear(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).mul(4).exp() / k ** 0.5
    return fl.quantize_weight_per_channel(w)


def test_halves_tiles_keep_the_bytes_per_program_with_every_warp_along_k() -> None:
    assert fp8_halves.halves_tile(16, 512, 4096) == (16, 512, 1)
    assert fp8_halves.halves_tile(8, 1024, 4096) == (8, 1024, 2)
    assert fp8_halves.halves_tile(32, 256, 4096) == (16, 512, 1)  # the chunk widened to one warp's 512
    assert fp8_halves.halves_tile(64, 128, 4096) == (16, 512, 1)
    assert fp8_halves.halves_tile(4, 2048, 14336) == (4, 2048, 4)
    assert fp8_halves.halves_tile(2, 8192, 8192) == (4, 4096, 8)  # at most 8 warps
    assert fp8_halves.halves_tile(4, 2048, 3072) == (8, 1024, 2)  # halved until it divides K
    assert fp8_halves.halves_tile(4, 2048, 1000) is None  # no chunk of >= 512 divides K
    assert fp8_halves.halves_tile(32, 512, 4096) == (16, 1024, 2)  # at most 16 rows: the chunk widens instead
    assert fp8_halves.halves_tile(64, 1024, 2048) is None  # 32 rows at the widest chunk that divides K
    assert fp8_halves.halves_fit(4, 2048, 4, 4096) and not fp8_halves.halves_fit(4, 2048, 8, 4096)
    assert not fp8_halves.halves_fit(4, 2048, 4, 3072) and not fp8_halves.halves_fit(1, 512, 1, 512)
    assert not fp8_halves.halves_fit(32, 512, 1, 512)


def test_the_switch_decides_the_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = gemv.GemvConfig("fma", 16, 512, num_warps=8, num_stages=1)
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", False)
    assert halves_config(plain, 4096) is plain and not uses_halves(gemv.GemvConfig("fma", 4, 2048, 4, 1), 4096)
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", True)
    assert halves_config(plain, 4096) == gemv.GemvConfig("fma", 16, 512, num_warps=1, num_stages=1)
    assert uses_halves(halves_config(plain, 4096), 4096)
    assert halves_config(plain, 1000) is plain and not uses_halves(plain, 1000)  # ragged K: the plain loop
    dot = gemv.GemvConfig("dot", 16, 64)
    assert halves_config(dot, 4096) is dot


@pytest.mark.parametrize("rows,block_k,warps,k", [(4, 512, 1, 1024), (2, 1024, 2, 2048), (8, 512, 1, 512)])
@pytest.mark.parametrize("w_first", [False, True])
def test_halves_sums_match_the_reference_and_the_plain_loop(rows: int, block_k: int, warps: int, k: int,
                                                            w_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    wq, ws = _random_linear(22, k, seed=rows * k)  # 22 rows: a clamped last block
    g = torch.Generator().manual_seed(k + rows)
    x = torch.randn(2, k, generator=g)
    b = torch.randn(22, generator=g)
    cfg = gemv.GemvConfig("fma", rows, block_k, num_warps=warps, num_stages=1)
    monkeypatch.setattr(gemv, "FP8_WEIGHTS_BEFORE_WAIT", w_first)
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", False)
    plain = fl.fp8_gemv_triton(x, wq, ws, b, config=cfg)
    silu_plain = gemv_silu.gemv_silu_mul_triton(x, wq, cfg, ws)
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", True)
    assert uses_halves(cfg, k)
    halves = fl.fp8_gemv_triton(x, wq, ws, b, config=cfg)
    silu_halves = gemv_silu.gemv_silu_mul_triton(x, wq, cfg, ws)
    ref = fl.fp8_linear_ref(x, wq, ws, b)
    torch.testing.assert_close(halves, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(halves, plain, atol=1e-4, rtol=1e-4)  # another fp32 order, same products
    gate, up = ref.sub(b).chunk(2, dim=-1)
    torch.testing.assert_close(silu_halves, torch.nn.functional.silu(gate) * up, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(silu_halves, silu_plain, atol=1e-4, rtol=1e-4)
    assert not torch.equal(halves, torch.zeros_like(halves))


def test_the_default_tiles_with_the_switch_on_run_the_halves_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # No explicit tile: the heuristic's, converted by halves_config (one warp per 512 of K), in bf16.
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", True)
    assert uses_halves(halves_config(fl.fp8_gemv_config(40, 1024, 132, 1), 1024), 1024)
    wq, ws = _random_linear(40, 1024, seed=5)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    y = fl.fp8_gemv_triton(x, wq, ws)
    torch.testing.assert_close(y.float(), fl.fp8_linear_ref(x.float(), wq, ws), atol=2e-2, rtol=2e-2)
