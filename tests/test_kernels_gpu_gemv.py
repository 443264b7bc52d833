"""GPU tests of the GEMV / skinny-GEMM kernel at Llama-3.1-8B's decode shapes (run with `pytest -m gpu`;
skipped without CUDA), and of the decode fast paths (GEMV and the fused rotary + KV write) under
CUDA-graph capture/replay.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import gemv, rope_kv_write  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS, TOL16, llama3_cos_sin  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


GEMV_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]  # 8B: K -> N


def _gemv_check(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int) -> None:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, device=DEV, dtype=dtype, generator=g)
    w = (torch.randn(n, k, device=DEV, dtype=dtype, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEV, dtype=dtype, generator=g) if bias else None
    y = gemv.gemv_triton(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == dtype and y.shape == (m, n)
    # Outputs ~ N(0, 1): one 16-bit rounding of an fp32 sum, like cuBLAS.
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("k,n", GEMV_SHAPES, ids=[f"{k}x{n}" for k, n in GEMV_SHAPES])
def test_gemv_8b_shapes(k: int, n: int) -> None:
    for m in (1, 2, 3, 8, 16):  # fma (1, 2) and dot (3..16); one compile per kind (M unspecialised)
        _gemv_check(m, k, n, torch.bfloat16, False, seed=m)


def test_gemv_fp16_and_bias() -> None:
    for m in (1, 5):
        _gemv_check(m, 4096, 6144, torch.float16, False, seed=m)
        _gemv_check(m, 3584, 4608, torch.bfloat16, True, seed=m)  # Qwen2.5-7B qkv with bias
        _gemv_check(m, 1000, 300, torch.bfloat16, True, seed=m)  # K not a multiple of BLOCK_K


def test_fast_paths_under_cuda_graph() -> None:
    """GEMV (dispatcher in "triton" mode, M = 1 and 4 inside one graph) and the fused rotary + KV
    write, captured once and replayed on new inputs."""
    dtype, hq, hkv, d, page = torch.bfloat16, 32, 8, 128, 16
    before = gemv.get_gemv_mode()
    gemv.set_gemv_mode("triton")
    try:
        w = torch.randn(6144, 4096, device=DEV, dtype=dtype) / 64
        x1 = torch.empty(1, 4096, device=DEV, dtype=dtype)
        x4 = torch.empty(4, 4096, device=DEV, dtype=dtype)
        qkv = torch.empty(4, (hq + 2 * hkv) * d, device=DEV, dtype=dtype)
        positions = torch.zeros(4, dtype=torch.long, device=DEV)
        slots = torch.zeros(4, dtype=torch.long, device=DEV)
        k_cache = torch.zeros(32, page, hkv, d, device=DEV, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        cos_sin = llama3_cos_sin(d, 4096)

        def fill(seed: int) -> None:
            g = torch.Generator(device=DEV).manual_seed(seed)
            for t in (x1, x4, qkv):
                t.copy_(torch.randn(t.shape, device=DEV, generator=g))
            positions.copy_(torch.randint(0, 4096, (4,), device=DEV, generator=g))
            slots.copy_(torch.randperm(32 * page, device=DEV, generator=g)[:4])

        def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q = rope_kv_write.rope_and_write_kv(q.view(4, hq, d), k.view(4, hkv, d), v.view(4, hkv, d), positions,
                                                cos_sin, k_cache, v_cache, slots)
            return gemv.linear(x1, w), gemv.linear(x4, w), q

        fill(0)
        step()  # compile and precompile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        for seed in (1, 2):
            fill(seed)
            qkv_in = qkv.clone()
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            q_ref, _ = rope_kv_write.rope_and_write_kv_ref(
                qkv_in[:, :hq * d].view(4, hq, d), qkv_in[:, hq * d:(hq + hkv) * d].view(4, hkv, d),
                qkv_in[:, (hq + hkv) * d:].view(4, hkv, d), positions, cos_sin, k_ref, v_ref, slots)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(outs[0].float(), (x1.float() @ w.float().T), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(outs[1].float(), (x4.float() @ w.float().T), atol=2e-2, rtol=2e-2)
            # v is copied as is; q and k are rotated (FMA-contracted on the GPU: within an ulp or so)
            assert torch.equal(v_cache, v_ref)
            torch.testing.assert_close(outs[2], q_ref, **TOL16)
            torch.testing.assert_close(k_cache, k_ref, **TOL16)
    finally:
        gemv.set_gemv_mode(before)
