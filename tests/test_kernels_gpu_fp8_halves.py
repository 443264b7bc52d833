"""GPU: kernels/fp8_halves.py's K loop at Llama-3.1-8B's and Llama-3.2-1B's shapes (run with `pytest -m gpu`):
the FP8 GEMV on each halves tile against the fp32 reference at M = 1 and 2, eager and replayed from a CUDA
graph, and the gate_up + SiLU twin. Fresh random weights, scales and inputs."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import fp8_halves, gemv_silu  # noqa: E402
from agentserve.kernels import fp8_linear as fl  # noqa: E402
from agentserve.kernels.fp8_gemv_tiles import uses_halves  # noqa: E402
from agentserve.kernels.gemv import GemvConfig  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS, TOL16  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]

SHAPES = [(4096, 6144), (4096, 4096), (14336, 4096), (2048, 3072), (8192, 2048)]  # K -> N
TILES = [(4, 2048, 4), (8, 1024, 2), (16, 512, 1), (2, 4096, 8)]


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, generator=g) / k ** 0.5 * (1 + torch.rand(n, 1, device=DEV, generator=g))
    return fl.quantize_weight_per_channel(w)


@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_halves_gemv_matches_the_reference_on_every_tile(k: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", True)
    wq, ws = _weights(n, k, seed=k + n)
    for rows, block_k, warps in TILES:
        cfg = GemvConfig("fma", rows, block_k, num_warps=warps, num_stages=1)
        if not uses_halves(cfg, k):
            continue
        for m in (1, 2):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            y = fl.fp8_gemv_triton(x, wq, ws, config=cfg)
            torch.testing.assert_close(y.float(), fl.fp8_linear_ref(x.float(), wq, ws), **TOL16)


def test_halves_in_a_cuda_graph_and_the_silu_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_halves, "FP8_GEMV_HALVES", True)
    wq, ws = _weights(4096, 4096, seed=1)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    eager = fl.fp8_gemv_triton(x, wq, ws)  # the default tile, through halves_config
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fl.fp8_gemv_triton(x, wq, ws)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.float(), fl.fp8_linear_ref(x.float(), wq, ws), **TOL16)
    assert not torch.equal(captured, eager)
    gate_up_q, gate_up_s = _weights(2 * 14336, 4096, seed=2)
    out = gemv_silu.gemv_silu_mul_triton(x, gate_up_q, GemvConfig("fma", 8, 1024, num_warps=2, num_stages=1),
                                         gate_up_s)
    gate, up = fl.fp8_linear_ref(x.float(), gate_up_q, gate_up_s).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate.bfloat16().float()).bfloat16().float() * up.bfloat16().float())
    torch.testing.assert_close(out.float(), want, **TOL16)
