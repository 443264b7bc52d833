"""kernels/gemv_lora.py: the batch-1 GEMV with the LoRA expand in its epilogue gives what the base
GEMV followed by kernels/lora.py's expand gives (interpreter on the CPU; real shapes on a GPU with
`pytest -m gpu`)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import gemv, gemv_lora, lora  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the interpreter on the CPU)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(k: int, slice_sizes: list[int], ranks: list[list[int]], dtype: torch.dtype, bias: bool, seed: int) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    n, max_loras, max_rank = sum(slice_sizes), len(ranks), max(max(r) for r in ranks)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEV, generator=g)

    lora_a = (randn(max_loras, len(slice_sizes), max_rank, k) / k ** 0.5).to(dtype)
    lora_b = (randn(max_loras, max_rank, n) / max_rank ** 0.5).to(dtype)
    rank_t = torch.tensor(ranks, dtype=torch.int32, device=DEV)
    for slot, row in enumerate(ranks):  # rows past a slice's rank are zero, as the manager loads them
        for s, r in enumerate(row):
            lora_a[slot, s, r:] = 0
    return dict(weight=(randn(n, k) / k ** 0.5).to(dtype), bias=randn(n).to(dtype) if bias else None,
                lora_a=lora_a, lora_b=lora_b, ranks=rank_t,
                scaling=torch.rand(max_loras, len(slice_sizes), device=DEV, generator=g) + 0.5,
                starts=lora.slice_starts_for(slice_sizes, torch.device(DEV)), slice_sizes=slice_sizes)


def _two_kernels(c: dict, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    meta = lora.build_lora_batch_meta(slots, c["lora_a"].shape[0])
    shrunk = lora.lora_shrink(x, c["lora_a"], c["ranks"], meta)
    y = gemv.gemv_triton(x, c["weight"], c["bias"])
    lora.lora_expand(y, shrunk, c["lora_b"], c["ranks"], c["scaling"], meta, c["starts"])
    return y, shrunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,slice_sizes,bias", [(256, [64, 32, 32], False), (200, [48, 80], True), (128, [96], False)],
                         ids=["qkv", "gate-up-ragged-k-bias", "o"])
def test_epilogue_matches_gemv_then_expand(dtype: torch.dtype, k: int, slice_sizes: list[int], bias: bool) -> None:
    # Slot 0 targets every slice at rank 8, slot 1 skips its first slice (rank 0) and uses 16 elsewhere.
    ranks = [[8] * len(slice_sizes), [0] + [16] * (len(slice_sizes) - 1)]
    c = _case(k, slice_sizes, ranks, dtype, bias, seed=k)
    for slots in ([0], [1], [1, -1], [-1, 0]):
        token_slots = torch.tensor(slots, dtype=torch.int32, device=DEV)
        x = torch.randn(len(slots), k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(7)).to(dtype)
        expected, shrunk = _two_kernels(c, x, token_slots)
        got = gemv_lora.gemv_add_lora(x, c["weight"], c["bias"], shrunk, c["lora_b"], c["ranks"], c["scaling"],
                                      token_slots, c["starts"])
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got, expected, **tol)
        base = gemv.gemv_triton(x, c["weight"], c["bias"])
        for row, slot in enumerate(slots):
            if slot < 0:  # a base row: exactly the base GEMV
                assert torch.equal(got[row], base[row])
            elif slot == 1:  # the untargeted first slice keeps the base output there
                assert torch.equal(got[row, :slice_sizes[0]], base[row, :slice_sizes[0]])
                assert torch.equal(got[row], base[row]) == (len(slice_sizes) == 1)
            else:
                assert not torch.equal(got[row], base[row])


def test_flag_off_keeps_the_two_kernel_path() -> None:
    x = torch.zeros(1, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(64, 64, device=DEV, dtype=torch.bfloat16)
    assert gemv_lora.LORA_GEMV == (os.environ.get("AGENTSERVE_LORA_GEMV") == "1")
    if not gemv_lora.LORA_GEMV:
        assert not gemv_lora.use_gemv_lora(x, w)


def test_rejects_more_rows_than_the_fma_kernel_takes() -> None:
    c = _case(64, [32], [[8]], torch.float32, False, seed=1)
    rows = gemv.FMA_MAX_M + 1
    shrunk = torch.zeros(1, 1, rows, 8, device=DEV)
    with pytest.raises(ValueError, match="M <="):
        gemv_lora.gemv_add_lora(torch.zeros(rows, 64, device=DEV), c["weight"], None, shrunk, c["lora_b"], c["ranks"],
                                c["scaling"], torch.zeros(rows, dtype=torch.int32, device=DEV), c["starts"])
