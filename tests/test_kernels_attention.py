"""Paged attention: Triton kernels against the torch reference.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors at tiny shapes
(TRITON_INTERPRET must be set before anything imports triton kernels; the Makefile sets it too).
The interpreter truncates fp32->bf16 casts and multiplies bf16 as raw integers in tl.dot, so
these tests use fp32 and fp16; bf16 is covered by the GPU tests (tests/test_kernels_gpu_attention.py).
The dispatchers only pick Triton for CUDA tensors, so the tests call the *_triton functions.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import agentserve.kernels as kernels  # noqa: E402
from agentserve.kernels import paged_attention as pa  # noqa: E402
from helpers.paged_batch import PagedBatch, random_paged_batch  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(pa._paged_attention_kernel)

SCALE = 0.37  # not 1/sqrt(D), so a kernel that ignores `scale` fails


def _check(batch: PagedBatch, out: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    k_clean, v_clean = batch.clean_caches()
    ref = pa.paged_attention_ref(*batch.args(k_clean, v_clean), SCALE, batch.max_query_len, batch.max_seq_len)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# (q_lens, ctx_lens): prefill chunk with a cached prefix, decode, verification (k+1 = 4), a fresh
# prompt, a chunk crossing several pages; lengths chosen not to be page or tile multiples.
MIXED = ([9, 1, 4, 13, 1, 6], [21, 40, 11, 0, 3, 17])


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("head_dim,page_size", [(16, 4), (32, 16), (24, 8)])
def test_unified_mixed_batch_fp32(num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> None:
    batch = random_paged_batch(*MIXED, num_q_heads, num_kv_heads, head_dim, page_size, torch.float32,
                                  seed=head_dim * 100 + page_size + num_kv_heads)
    out = pa.paged_attention_triton(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len)
    _check(batch, out, atol=1e-4)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
def test_unified_small_tiles_many_iterations(block_m: int, block_n: int) -> None:
    """Forces small tiles so every request spans several query tiles and KV tiles: exercises the
    tile->request search, the unmasked/masked loop split and pages smaller and larger than BLOCK_N."""
    for page_size in (4, 32):
        batch = random_paged_batch([17, 1, 5, 30], [35, 50, 0, 2], 4, 2, 16, page_size, torch.float32,
                                      seed=block_m + block_n + page_size)
        cfg = pa.AttnConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)
        out = pa.paged_attention_triton(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len, config=cfg)
        _check(batch, out, atol=1e-4)


def test_unified_fp16_and_strided_q() -> None:
    batch = random_paged_batch(*MIXED, 4, 2, 32, 8, torch.float16, seed=7)
    # q as a strided view of a fused projection output, as the model produces it.
    fused = torch.randn(batch.q.shape[0], 4 * 32 + 64, dtype=torch.float16)
    fused[:, : 4 * 32] = batch.q.reshape(batch.q.shape[0], -1)
    batch.q = fused[:, : 4 * 32].view(batch.q.shape[0], 4, 32)
    out = pa.paged_attention_triton(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len)
    _check(batch, out, atol=2e-3, rtol=1e-2)


def test_unified_group_not_power_of_two_and_empty_requests() -> None:
    # GQA group 3 (rows = token * 3 + head), a q_len-0 request and a seq_len-0 padding request
    # (CUDA-graph padding: output must be 0 like the reference, not NaN).
    batch = random_paged_batch([3, 0, 1, 1], [5, 9, 20, 0], 6, 2, 16, 4, torch.float32, seed=3)
    batch.seq_lens[3] = 0
    batch.max_seq_len = int(batch.seq_lens.max())
    out = pa.paged_attention_triton(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len)
    _check(batch, out, atol=1e-4)
    assert out[-1].abs().max() == 0


@pytest.mark.parametrize("num_q_heads,num_kv_heads,page_size", [(4, 4, 4), (4, 1, 8), (6, 2, 16)])
def test_split_kv_decode(num_q_heads: int, num_kv_heads: int, page_size: int) -> None:
    batch = random_paged_batch([1, 1, 1, 1], [70, 1, 33, 130], num_q_heads, num_kv_heads, 16, page_size,
                                  torch.float32, seed=num_q_heads + page_size)
    for splits in (1, 2, 3, 8):  # 8 splits of a 2-token context: most splits are empty
        out = pa.paged_attention_decode_split_triton(*batch.args(), SCALE, 1, batch.max_seq_len,
                                                     num_splits=splits, block_n=16)
        _check(batch, out, atol=1e-4)


def test_split_kv_fp16_padding_rows() -> None:
    batch = random_paged_batch([1, 0, 1, 1], [90, 5, 40, 0], 4, 2, 32, 16, torch.float16, seed=11)
    batch.seq_lens[3] = 0  # padded decode slot
    out = pa.paged_attention_decode_split_triton(*batch.args(), SCALE, 1, batch.max_seq_len, num_splits=4)
    _check(batch, out, atol=2e-3, rtol=1e-2)
    assert out[-1].abs().max() == 0


@pytest.mark.parametrize("num_q_heads,num_kv_heads,page_size", [(4, 4, 4), (4, 1, 8), (6, 2, 16)])
def test_split_kv_short_queries(num_q_heads: int, num_kv_heads: int, page_size: int) -> None:
    """Verification-shaped rows (the last q_len tokens of each sequence, causal among themselves) with
    decode rows, a whole short prompt and a row whose last split lies past its first tokens (ctx 14,
    q 5: keys 16-18 of a 16-key split are invisible to the first rows)."""
    batch = random_paged_batch([5, 1, 3, 5, 2, 5], [70, 1, 33, 14, 130, 0], num_q_heads, num_kv_heads, 16,
                               page_size, torch.float32, seed=num_q_heads * 7 + page_size)
    for splits in (1, 2, 3, 8):
        out = pa.paged_attention_decode_split_triton(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len,
                                                     num_splits=splits, block_n=16)
        _check(batch, out, atol=1e-4)


def test_split_kv_rejects_longer_queries() -> None:
    n = pa.SPLIT_QUERY_LEN_LIMIT + 1
    batch = random_paged_batch([n, 1], [5, 5], 2, 1, 16, 4, torch.float32, seed=1)
    with pytest.raises(ValueError, match="at most"):
        pa.paged_attention_decode_split_triton(*batch.args(), SCALE, n, batch.max_seq_len)


def test_split_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pa, "SPLIT_LONG", False)  # the short-grid rule alone (the long rule: below)
    # Llama-3.1-8B on an H100: 8 kv heads, 132 SMs.
    assert pa.use_split_kv(1, 8192, 8, 132)
    assert pa.num_kv_splits(1, 8192, 8, 132) == 33  # capped by ~SPLIT_TARGET_WAVES programs per SM
    assert pa.num_kv_splits(1, 640, 8, 132) == 640 // pa.SPLIT_MIN_KEYS  # capped by SPLIT_MIN_KEYS
    assert pa.num_kv_splits(1, 1 << 20, 8, 132) == 33  # capped by ~SPLIT_TARGET_WAVES programs per SM
    assert pa.use_split_kv(16, 4096, 8, 132)  # 128 programs < 132 SMs -> 2 splits
    assert not pa.use_split_kv(17, 4096, 8, 132)  # a full wave already
    assert not pa.use_split_kv(64, 8192, 8, 132)
    assert not pa.use_split_kv(1, 2 * pa.SPLIT_MIN_KEYS - 1, 8, 132)  # too short to give two splits
    assert pa.num_kv_splits(1, 10**9, 1, 132) == pa.SPLIT_MAX


def test_split_heuristic_for_long_contexts_at_full_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pa, "SPLIT_LONG", False)
    assert pa.num_kv_splits(26, 16384, 8, 132) == 1  # AGENTSERVE_SPLIT_LONG=0: a full grid never splits
    monkeypatch.setattr(pa, "SPLIT_LONG", True)
    assert pa.num_kv_splits(26, 16384, 8, 132) == 3  # 208 programs -> ~4 waves: 3 splits
    assert pa.num_kv_splits(64, 8192, 8, 132) == 2
    assert pa.num_kv_splits(26, 2048, 8, 132) == 1  # short contexts: unchanged
    assert pa.num_kv_splits(26, 5000, 8, 132) == 3
    assert pa.num_kv_splits(200, 4096, 8, 132) == 1  # 1,600 programs: ~12 waves already
    assert pa.num_kv_splits(100, 4096, 2, 132) == 3  # 200 programs
    assert pa.num_kv_splits(8, 8192, 8, 132) == 4  # below a full grid: the short-grid rule, as before


def test_tiles() -> None:
    assert pa.decode_tile(128) == (128, 2) and pa.decode_tile(64) == (128, 2)
    assert pa.decode_tile(256) == pa.DECODE_TILE_LARGE_HEADS  # two wide stages would not fit shared memory
    bf16 = torch.bfloat16
    assert pa.attention_config(128, 4, 5, bf16).block_n == 128  # verification: decode tile
    prefill = pa.attention_config(128, 4, 512, bf16)
    assert (prefill.block_m, prefill.block_n, prefill.num_warps, prefill.num_stages) == (64, 64, 4, 3)
    assert pa.attention_config(128, 32, 512, bf16).block_m == 64  # GQA 32: 2 tokens per tile
    assert pa.attention_config(256, 4, 512, bf16).num_stages == 2


def test_tile_overrides_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSERVE_PREFILL_TILE", "128,64,8,3")
    assert pa._tile_from_env("AGENTSERVE_PREFILL_TILE", (64, 64, 4, 3)) == (128, 64, 8, 3)
    monkeypatch.setenv("AGENTSERVE_PREFILL_TILE", "128,60,8,3")
    with pytest.raises(ValueError, match="powers of two but the last"):
        pa._tile_from_env("AGENTSERVE_PREFILL_TILE", (64, 64, 4, 3))
    monkeypatch.setenv("AGENTSERVE_DECODE_TILE", "64")
    with pytest.raises(ValueError, match="2 comma-separated values"):
        pa._tile_from_env("AGENTSERVE_DECODE_TILE", (128, 2))


def test_dispatcher_uses_reference_on_cpu() -> None:
    batch = random_paged_batch(*MIXED, 4, 2, 16, 4, torch.float32, poison=False, seed=5)
    args = (*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len)
    ref = pa.paged_attention_ref(*args)
    assert torch.equal(pa.paged_attention(*args), ref)
    kernels.set_backend("torch")
    try:
        assert kernels.get_backend() == "torch"
        assert torch.equal(pa.paged_attention(*args), ref)
    finally:
        kernels.set_backend("auto")
    with pytest.raises(ValueError):
        kernels.set_backend("cuda")


def test_attention_config_covers_group() -> None:
    for group in (1, 3, 4, 8, 16, 32):
        for mql in (1, 5, 512):
            for dtype in (torch.float32, torch.bfloat16):
                cfg = pa.attention_config(128, group, mql, dtype)
                assert cfg.block_m >= group and cfg.block_m >= 16 and cfg.block_n >= 16
