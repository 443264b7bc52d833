"""GPU tests of the Triton kernels at real shapes (run with `pytest -m gpu`; skipped without CUDA).

Fresh random inputs each case, bf16 and fp16 (plus fp32 for the attention kernel), head dims 64
and 128, GQA ratios 1/4/8, page sizes 16 and 32, ragged batches mixing prefill chunks with a
cached prefix, decode and verification, pages scattered through the pool with NaN poison in every
slot a kernel must not read, long contexts for the split-KV path, and CUDA-graph capture/replay.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import activation, kv_write, rmsnorm, rotary  # noqa: E402
from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON  # noqa: E402

_INTERPRETED = HAS_TRITON and type(pa._paged_attention_kernel).__name__ == "InterpretedFunction"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAS_TRITON, reason="needs triton"),
    pytest.mark.skipif(_INTERPRETED, reason="GPU tests need compiled Triton: unset TRITON_INTERPRET"),
]

DEV = "cuda"
LOW = [torch.bfloat16, torch.float16]
TOL16 = dict(atol=2e-2, rtol=2e-2)
TOL32 = dict(atol=1e-4, rtol=1e-4)
HEADS = [(8, 8), (32, 8), (32, 4)]  # GQA ratios 1, 4, 8


def _ref(batch: pa.PagedBatch, scale: float) -> torch.Tensor:
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


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("page_size", [16, 32])
def test_attention_mixed_batch(dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int,
                               page_size: int) -> None:
    batch = pa.random_paged_batch(MIXED_Q, MIXED_CTX, num_q_heads, num_kv_heads, head_dim, page_size, dtype, DEV)
    scale = head_dim ** -0.5
    ref = _ref(batch, scale)
    out = pa.paged_attention(*batch.args(), scale, batch.max_query_len, batch.max_seq_len)  # dispatcher
    _assert_close(out, ref, dtype)
    out = pa.paged_attention_triton(*batch.args(), scale, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, ref, dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_attention_mixed_batch_fp32(head_dim: int, num_q_heads: int, num_kv_heads: int) -> None:
    batch = pa.random_paged_batch(MIXED_Q, MIXED_CTX, num_q_heads, num_kv_heads, head_dim, 16, torch.float32, DEV)
    out = pa.paged_attention(*batch.args(), 0.1, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, _ref(batch, 0.1), torch.float32)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_attention_long_prefill(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int) -> None:
    # A 3000-token prompt in one chunk and its last 512-token chunk over a 2488-token prefix.
    batch = pa.random_paged_batch([3000, 512], [0, 2488], num_q_heads, num_kv_heads, 128, 16, dtype, DEV)
    out = pa.paged_attention(*batch.args(), 128 ** -0.5, batch.max_query_len, batch.max_seq_len)
    _assert_close(out, _ref(batch, 128 ** -0.5), dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_split_kv_long_context(dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int,
                                      page_size: int) -> None:
    ctx = [8191, 20000, 33]
    batch = pa.random_paged_batch([1, 1, 1], ctx, num_q_heads, num_kv_heads, head_dim, page_size, dtype, DEV)
    scale = head_dim ** -0.5
    ref = _ref(batch, scale)
    args = (*batch.args(), scale, 1, batch.max_seq_len)
    for splits in (None, 2, 7, 32, pa.SPLIT_MAX):
        _assert_close(pa.paged_attention_decode_split_triton(*args, num_splits=splits), ref, dtype)
    _assert_close(pa.paged_attention_triton(*args), ref, dtype)  # the unsplit decode path
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert pa.use_split_kv(3, batch.max_seq_len, num_kv_heads, sms)
    _assert_close(pa.paged_attention(*args), ref, dtype)  # dispatcher -> split path


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("batch_size,max_ctx", [(64, 3000), (256, 800)])  # bounded by the reference's memory
def test_decode_large_batch(dtype: torch.dtype, batch_size: int, max_ctx: int) -> None:
    gen = torch.Generator().manual_seed(batch_size)
    ctx = torch.randint(0, max_ctx, (batch_size,), generator=gen).tolist()
    batch = pa.random_paged_batch([1] * batch_size, ctx, 32, 8, 128, 16, dtype, DEV)
    args = (*batch.args(), 128 ** -0.5, 1, batch.max_seq_len)
    ref = _ref(batch, 128 ** -0.5)
    _assert_close(pa.paged_attention(*args), ref, dtype)
    _assert_close(pa.paged_attention_decode_split_triton(*args, num_splits=4), ref, dtype)


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


def test_elementwise_cuda_graph_replay() -> None:
    dtype = torch.bfloat16
    x = torch.empty(16, 4096, dtype=dtype, device=DEV)
    res = torch.empty_like(x)
    w = torch.randn(4096, dtype=dtype, device=DEV)
    gate_up = torch.empty(16, 2 * 14336, dtype=dtype, device=DEV)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed, new_res = rmsnorm.rms_norm(x, w, 1e-5, res)
        return normed, new_res, activation.silu_and_mul(gate_up)

    for t in (x, res, gate_up):
        t.copy_(torch.randn(t.shape, device=DEV))
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for t in (x, res, gate_up):
        t.copy_(torch.randn(t.shape, device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    n_ref, r_ref = rmsnorm.rms_norm_ref(x, w, 1e-5, res)
    torch.testing.assert_close(outs[0], n_ref, **TOL16)
    assert torch.equal(outs[1], r_ref)
    torch.testing.assert_close(outs[2], activation.silu_and_mul_ref(gate_up), **TOL16)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv(dtype: torch.dtype, page_size: int, head_dim: int) -> None:
    tokens, num_kv_heads, num_q_heads, pool = 3000, 8, 32, 1000
    fused = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=DEV, dtype=dtype)
    key = fused[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    value = fused[:, (num_q_heads + num_kv_heads) * head_dim:].view(tokens, num_kv_heads, head_dim)
    slots = torch.randperm(pool * page_size, device=DEV)[:tokens]
    slots[torch.randperm(tokens, device=DEV)[:100]] = -1
    k_cache = torch.randn(pool, page_size, num_kv_heads, head_dim, dtype=dtype, device=DEV)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_write.write_kv_ref(key, value, k_ref, v_ref, slots)
    kv_write.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_rms_norm(dtype: torch.dtype, with_residual: bool, hidden: int) -> None:
    x = torch.randn(1000, hidden, dtype=dtype, device=DEV) * 3
    res = torch.randn_like(x) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    out_ref, res_ref = rmsnorm.rms_norm_ref(x, w, 1e-5, res)
    out, new_res = rmsnorm.rms_norm(x, w, 1e-5, res)
    torch.testing.assert_close(out, out_ref, **(TOL32 if dtype == torch.float32 else TOL16))
    assert torch.equal(new_res, res_ref)
    # bf16/fp16 outputs may differ from the reference by one ulp where rsqrt/summation order
    # moves a value across a rounding boundary; they should almost all be identical.
    if dtype != torch.float32:
        assert (out != out_ref).float().mean() < 0.01


def _llama3_cos_sin(head_dim: int, max_pos: int) -> torch.Tensor:
    """Llama-3.1 rope (theta 500000, factor 8, low 1, high 4, original 8192), as transformers builds it."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    factor, low, high, old_len = 8.0, 1.0, 4.0, 8192.0
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = torch.where(is_medium, smoothed, scaled)
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEV)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_llama3(dtype: torch.dtype, head_dim: int) -> None:
    tokens, hq, hkv = 2000, 32, 8
    fused = torch.randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=DEV)
    q = fused[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = fused[:, hq * head_dim:(hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    cache = _llama3_cos_sin(head_dim, 32768)
    positions = torch.randint(0, 32768, (tokens,), device=DEV)
    q_ref, k_ref = rotary.apply_rotary_ref(q, k, positions, cache)
    q_out, k_out = rotary.apply_rotary(q, k, positions, cache)  # dispatcher: in place
    assert q_out.data_ptr() == q.data_ptr()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_out, k_ref, **tol)
    if dtype != torch.float32:  # same rounding steps as the reference: bit-identical
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(500, 2 * 14336, dtype=dtype, device=DEV) * 4
    out = activation.silu_and_mul(x)
    ref = activation.silu_and_mul_ref(x)
    torch.testing.assert_close(out, ref, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL16))
