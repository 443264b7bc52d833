"""The split-row argmax (kernels/argmax.py) against torch.argmax in Triton's interpreter: first index
on ties, NaN ranked first, -inf rows, ragged last chunks, strided rows, bf16 and fp32."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import argmax  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(argmax._argmax_chunk_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, argmax.CHUNK * 3 + 17), (5, argmax.CHUNK * 2), (3, 100)])
def test_matches_torch(dtype: torch.dtype, rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    assert torch.equal(argmax.argmax_triton(x), x.argmax(dim=-1))


def test_ties_take_the_first_index_across_chunks() -> None:
    cols = argmax.CHUNK * 4 + 5
    x = torch.zeros(4, cols)
    x[0, [7, argmax.CHUNK + 3, cols - 1]] = 2.0       # the same maximum in three chunks
    x[1, [argmax.CHUNK * 2 + 1, argmax.CHUNK * 2]] = 1.0  # two in one chunk
    x[2] = float("-inf")                                 # nothing allowed: torch says 0
    x[3, -1] = 5.0                                       # the last, ragged chunk
    assert argmax.argmax_triton(x).tolist() == x.argmax(dim=-1).tolist() == [7, argmax.CHUNK * 2, 0, cols - 1]


def test_nan_ranks_first_like_torch() -> None:
    cols = argmax.CHUNK * 3
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0))
    x[0, argmax.CHUNK + 9] = float("nan")
    x[0, 4] = float("inf")
    x[1, [argmax.CHUNK * 2 + 1, 11]] = float("nan")
    assert torch.equal(argmax.argmax_triton(x), x.argmax(dim=-1))


def test_strided_rows() -> None:
    base = torch.randn(6, argmax.CHUNK * 2 + 40, generator=torch.Generator().manual_seed(1))
    view = base[::2, 8:]
    assert torch.equal(argmax.argmax_triton(view), view.argmax(dim=-1))


def test_dispatch_keeps_torch_off_cuda_and_for_short_rows() -> None:
    x = torch.randn(2, 50)
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))
