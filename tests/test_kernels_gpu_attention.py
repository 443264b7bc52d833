"""GPU tests of the paged-attention kernel at real shapes (run with `pytest -m gpu`; skipped without
CUDA).

Fresh random inputs each case, bf16 and fp16 (plus fp32), head dims 64 and 128, GQA ratios 1/4/8,
page sizes 16 and 32, ragged batches mixing prefill chunks with a cached prefix, decode and
verification, pages scattered through the pool with NaN poison in every slot a kernel must not
read, long contexts for the split-KV path, and CUDA-graph capture/replay.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import kv_write  # noqa: E402
from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.kernels._triton_utils import next_pow2  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS, TOL16, TOL32  # noqa: E402
from helpers.paged_batch import PagedBatch, random_paged_batch  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


def _ref(batch: PagedBatch, scale: float) -> torch.Tensor:
    k_clean, v_clean = batch.clean_caches()
    return pa.paged_attention_ref(*batch.args(k_clean, v_clean), scale, batch.max_query_len, batch.max_seq_len)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all(), "non-finite output: a kernel read poisoned memory"
    torch.testing.assert_close(out.float(), ref.float(), **(TOL32 if dtype == torch.float32 else TOL16))


# Ragged mix: prefill chunk over a cached prefix, decodes at several context lengths, speculative
# verification (k+1 = 5 and 3), a fresh prompt, a 1-token context; none page- or tile-aligned.
MIXED_Q = [512, 1, 1, 5, 300, 1, 3, 1]
MIXED_CTX = [1000, 4000, 17, 900, 0, 2500, 64, 0]
# Decode + verification only (max_query_len 5: the small-tile decode config, causal within each
# 5-token chunk), over cached prefixes of ragged lengths.
VERIFY_Q = [5, 1, 4, 1, 2, 5]
VERIFY_CTX = [3000, 1, 700, 129, 2047, 33]
# Long contexts for the split-KV decode path (batch 3: the heuristic splits).
SPLIT_CTX = [8191, 20000, 33]

# A covering design instead of the full product: every dtype meets both head dims, every GQA ratio
# and both page sizes; Llama-3.1-8B's layout (bf16, 128, 32/8, page 16) is first. The full product
# (24 cases x ~7 kernel variants) compiled ~200 Triton kernels and dominated the suite's time;
# each case here compiles 4 (unified prefill tiles, unified decode tiles, split, reduce).
CASES = [
    (torch.bfloat16, 128, 32, 8, 16),
    (torch.bfloat16, 64, 32, 4, 32),
    (torch.bfloat16, 128, 8, 8, 32),
    (torch.float16, 64, 8, 8, 16),
    (torch.float16, 128, 32, 4, 16),
    (torch.float16, 64, 32, 8, 32),
]
CASE_IDS = [f"{str(d)[6:]}-d{h}-{q}x{k}-p{p}" for d, h, q, k, p in CASES]


@pytest.mark.parametrize("dtype,head_dim,num_q_heads,num_kv_heads,page_size", CASES, ids=CASE_IDS)
def test_attention(dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int, page_size: int) -> None:
    """Every path of one head layout: the mixed batch (prefill tiles, through the dispatcher),
    decode + verification (decode tiles), and split-KV decode over long contexts (an uneven
    explicit split count, the heuristic's through the dispatcher, and the unsplit kernel)."""
    scale = head_dim ** -0.5
    batch = random_paged_batch(MIXED_Q, MIXED_CTX, num_q_heads, num_kv_heads, head_dim, page_size, dtype, DEV,
                                  seed=1)
    out = pa.paged_attention(*batch.args(), scale, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, _ref(batch, scale), dtype)

    batch = random_paged_batch(VERIFY_Q, VERIFY_CTX, num_q_heads, num_kv_heads, head_dim, page_size, dtype, DEV,
                                  seed=2)
    out = pa.paged_attention(*batch.args(), scale, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, _ref(batch, scale), dtype)

    batch = random_paged_batch([1, 1, 1], SPLIT_CTX, num_q_heads, num_kv_heads, head_dim, page_size, dtype, DEV,
                                  seed=3)
    ref = _ref(batch, scale)
    args = (*batch.args(), scale, 1, batch.max_seq_len)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heuristic = pa.num_kv_splits(3, batch.max_seq_len, num_kv_heads, sms)
    assert heuristic > 1
    _assert_close(pa.paged_attention(*args), ref, dtype)  # dispatcher -> split path, heuristic count
    # Same next_pow2 as the heuristic's count (no extra reduce-kernel compile) but uneven.
    uneven = max(2, next_pow2(heuristic) - 1)
    _assert_close(pa.paged_attention_decode_split_triton(*args, num_splits=uneven), ref, dtype)
    _assert_close(pa.paged_attention_triton(*args), ref, dtype)  # the unsplit decode path


def test_attention_fp32() -> None:
    batch = random_paged_batch(MIXED_Q, MIXED_CTX, 32, 8, 128, 16, torch.float32, DEV, seed=4)
    out = pa.paged_attention(*batch.args(), 0.1, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, _ref(batch, 0.1), torch.float32)


def test_attention_long_prefill() -> None:
    # A 3000-token prompt in one chunk and its last 512-token chunk over a 2488-token prefix.
    batch = random_paged_batch([3000, 512], [0, 2488], 32, 8, 128, 16, torch.bfloat16, DEV, seed=5)
    out = pa.paged_attention(*batch.args(), 128 ** -0.5, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, _ref(batch, 128 ** -0.5), torch.bfloat16)


def test_decode_large_batch() -> None:
    gen = torch.Generator().manual_seed(256)
    ctx = torch.randint(0, 800, (256,), generator=gen).tolist()  # bounded by the reference's memory
    batch = random_paged_batch([1] * 256, ctx, 32, 8, 128, 16, torch.bfloat16, DEV, seed=6)
    args = (*batch.args(), 128 ** -0.5, 1, batch.max_seq_len)
    ref = _ref(batch, 128 ** -0.5)
    _assert_close(pa.paged_attention(*args), ref, torch.bfloat16)
    _assert_close(pa.paged_attention_decode_split_triton(*args, num_splits=4), ref, torch.bfloat16)


def test_split_kv_verification_rows() -> None:
    """Speculative verification through the split path at the 8B's layout: 5-token queries (causal
    among themselves) at batch 1 and 4, and a context whose last split holds only keys after the first
    query tokens (126 cached + 5 new over 128-key tiles: keys 128-130 are invisible to rows 0 and 1)."""
    scale = 128 ** -0.5
    for q_lens, ctx in (([5], [300]), ([5], [126]), ([5, 5, 5, 5], [126, 1000, 37, 4000])):
        batch = random_paged_batch(q_lens, ctx, 32, 8, 128, 16, torch.bfloat16, DEV, seed=sum(ctx))
        ref = _ref(batch, scale)
        args = (*batch.args(), scale, 5, batch.max_seq_len)
        _assert_close(pa.paged_attention(*args), ref, torch.bfloat16)  # the dispatcher (split when enabled)
        for splits in (2, 3, 8):
            _assert_close(pa.paged_attention_decode_split_triton(*args, num_splits=splits), ref, torch.bfloat16)


@pytest.mark.parametrize("split", [False, True])
def test_attention_cuda_graph_replay(split: bool) -> None:
    """Captured once, replayed with longer contexts (beyond the capture's max_seq_len), new block
    tables and new queries: grids must not depend on device values, and nothing may sync."""
    dtype, bs = torch.bfloat16, 4 if split else 32
    num_q_heads, num_kv_heads, head_dim, page = 32, 8, 128, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    capture_max_seq = 2048
    assert pa.use_split_kv(bs, capture_max_seq, num_kv_heads, sms) == split
    width = 384  # pages per request: 384 * 16 = 6144 >= the longest replayed context
    pool = bs * width + 8
    k_cache = torch.randn(pool, page, num_kv_heads, head_dim, dtype=dtype, device=DEV)
    v_cache = torch.randn(pool, page, num_kv_heads, head_dim, dtype=dtype, device=DEV)
    q = torch.empty(bs, num_q_heads, head_dim, dtype=dtype, device=DEV)
    new_k = torch.empty(bs, num_kv_heads, head_dim, dtype=dtype, device=DEV)
    new_v = torch.empty_like(new_k)
    tables = torch.zeros(bs, width, dtype=torch.int32, device=DEV)
    qsl = torch.arange(bs + 1, dtype=torch.int32, device=DEV)
    seq_lens = torch.ones(bs, dtype=torch.int32, device=DEV)
    slots = torch.full((bs,), -1, dtype=torch.int64, device=DEV)
    scale = head_dim ** -0.5

    def fill(step: int) -> None:
        gen = torch.Generator().manual_seed(step)
        lens = torch.randint(1, 6000 if step else capture_max_seq, (bs,), generator=gen)
        perm = torch.randperm(pool, generator=gen)[: bs * width].view(bs, width)
        tables.copy_(perm.to(torch.int32))
        seq_lens.copy_(lens.to(torch.int32))
        last = (lens - 1)
        slots.copy_((perm.gather(1, (last // page)[:, None])[:, 0] * page + last % page).to(torch.int64))
        slots[-1] = -1  # a padded slot: its K/V write is skipped
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        new_k.copy_(torch.randn(new_k.shape, generator=gen).to(dtype))
        new_v.copy_(torch.randn(new_v.shape, generator=gen).to(dtype))

    def step() -> torch.Tensor:
        kv_write.write_kv(new_k, new_v, k_cache, v_cache, slots)
        return pa.paged_attention(q, k_cache, v_cache, tables, qsl, seq_lens, scale, 1, capture_max_seq)

    fill(0)
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for i in (1, 2, 3):
        fill(i)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        kv_write.write_kv_ref(new_k, new_v, k_ref, v_ref, slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        ref = pa.paged_attention_ref(q, k_ref, v_ref, tables, qsl, seq_lens, scale, 1, int(seq_lens.max()))
        _assert_close(out, ref, dtype)
