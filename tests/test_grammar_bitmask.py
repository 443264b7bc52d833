"""Token bitmask application: the Triton kernel against the torch reference.

On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) at tiny shapes; `-m gpu` runs real shapes (128256-token vocabulary, batch 64)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from agentserve.kernels.token_bitmask import (
    HAS_TRITON,
    apply_token_bitmask,
    apply_token_bitmask_ref,
    apply_token_bitmask_triton,
    unpack_bitmask,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _random_case(batch: int, vocab: int, words: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g).to(dtype=dtype, device=device)
    bitmask = torch.randint(-(2 ** 31), 2 ** 31 - 1, (batch, words), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32).to(device)
    return logits, bitmask


def _manual(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> torch.Tensor:
    out = logits.clone()
    for r in rows:
        for t in range(logits.shape[1]):
            w = t // 32
            allowed = w < bitmask.shape[1] and (int(bitmask[r, w]) >> (t % 32)) & 1
            if not allowed:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab,words", [(1, 1), (31, 1), (32, 1), (33, 2), (70, 2), (70, 3)])
@pytest.mark.parametrize("use_indices", [False, True])
def test_reference_matches_bit_by_bit(vocab: int, words: int, use_indices: bool) -> None:
    logits, bitmask = _random_case(3, vocab, words, torch.float32, "cpu", seed=vocab * 10 + words)
    rows = [0, 2] if use_indices else [0, 1, 2]
    want = _manual(logits, bitmask, rows)
    got = apply_token_bitmask_ref(logits.clone(), bitmask, torch.tensor(rows) if use_indices else None)
    assert torch.equal(got, want)


def test_unpack_bitmask_layout() -> None:
    bm = torch.tensor([[0b101, -1]], dtype=torch.int32)  # tokens 0 and 2; all of 32..63
    allowed = unpack_bitmask(bm, 70)
    assert allowed[0, :3].tolist() == [True, False, True]
    assert allowed[0, 3:32].sum() == 0 and allowed[0, 32:64].all() and not allowed[0, 64:].any()
    bm = torch.tensor([[-(2 ** 31)]], dtype=torch.int32)  # only bit 31
    assert unpack_bitmask(bm, 32)[0].nonzero().flatten().tolist() == [31]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,vocab,words", [(1, 1, 1), (3, 33, 2), (5, 100, 4), (4, 257, 8), (2, 200, 5)])
@pytest.mark.parametrize("use_indices", [False, True])
def test_triton_matches_reference(dtype: torch.dtype, batch: int, vocab: int, words: int, use_indices: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, bitmask = _random_case(batch, vocab, words, dtype, device, seed=batch * 1000 + vocab)
    indices = torch.tensor([i for i in range(batch) if i % 2 == 0], device=device) if use_indices else None
    want = apply_token_bitmask_ref(logits.clone(), bitmask, indices)
    got = apply_token_bitmask_triton(logits.clone(), bitmask, indices, block=64)
    assert torch.equal(got, want)


@needs_triton
def test_triton_empty_indices_and_strided_rows() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, bitmask = _random_case(3, 40, 2, torch.float32, device, seed=7)
    before = logits.clone()
    apply_token_bitmask_triton(logits, bitmask, torch.tensor([], dtype=torch.long, device=device), block=32)
    assert torch.equal(logits, before)
    # rows of a wider buffer (logits[:, :V] of a padded tensor): row stride != V
    wide = torch.randn(3, 64, device=device)
    view = wide[:, :40]
    want = apply_token_bitmask_ref(view.clone(), bitmask)
    apply_token_bitmask_triton(view, bitmask, block=32)
    assert torch.equal(view, want)
    assert torch.isfinite(wide[:, 40:]).all()  # columns past the view untouched


def test_dispatch_on_cpu_uses_reference() -> None:
    logits, bitmask = _random_case(2, 50, 2, torch.float32, "cpu", seed=3)
    want = apply_token_bitmask_ref(logits.clone(), bitmask)
    assert torch.equal(apply_token_bitmask(logits.clone(), bitmask), want)


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        apply_token_bitmask_ref(torch.zeros(2, 10), torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(ValueError):
        apply_token_bitmask_ref(torch.zeros(2, 10), torch.zeros(2, 1, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_indices", [False, True])
def test_triton_real_shape_gpu(dtype: torch.dtype, use_indices: bool) -> None:
    batch, vocab = 64, 128256
    logits, bitmask = _random_case(batch, vocab, (vocab + 31) // 32, dtype, "cuda", seed=11)
    indices = torch.arange(0, batch, 3, device="cuda") if use_indices else None
    want = apply_token_bitmask_ref(logits.clone(), bitmask, indices)
    got = apply_token_bitmask(logits.clone(), bitmask, indices)  # dispatches to Triton on CUDA
    torch.cuda.synchronize()
    assert torch.equal(got, want)
