"""GPU: the split-row argmax (kernels/argmax.py) at a real vocabulary (Llama 3's 128,256), 1-64 rows,
against torch.argmax, inside a CUDA graph too (the samplers run it in the decode graphs' steps).
Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from agentserve.kernels import argmax
from helpers.gpu_kernels import DEV, GPU_SKIPS

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]

VOCAB = 128256


@pytest.mark.parametrize("rows", [1, 5, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch_at_vocabulary_size(rows: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device=DEV).manual_seed(rows)
    x = torch.randn(rows, VOCAB, device=DEV, generator=g).to(dtype)
    x[0, VOCAB - 1] = x[0].max() + 1  # the last, ragged chunk
    if rows > 1:
        x[1, [3, 70000]] = x[1].max() + 1  # a tie across chunks: the first index
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_nan_and_masked_rows() -> None:
    x = torch.randn(3, VOCAB, device=DEV)
    x[0, 90000] = float("nan")
    x[1] = float("-inf")
    x[2, 5] = float("inf")
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_in_a_cuda_graph() -> None:
    x = torch.randn(4, VOCAB, device=DEV)
    argmax.argmax_rows(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = argmax.argmax_rows(x)
    for seed in range(3):
        x.copy_(torch.randn(4, VOCAB, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, x.argmax(dim=-1))
