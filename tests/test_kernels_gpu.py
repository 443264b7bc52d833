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

from agentserve.kernels import activation, gemv, kv_write, rmsnorm, rope_kv_write, rotary  # noqa: E402
from agentserve.kernels import paged_attention as pa  # noqa: E402
from helpers.paged_batch import PagedBatch, random_paged_batch  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON, next_pow2  # noqa: E402

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


@pytest.mark.parametrize("dtype,page_size,head_dim", [(torch.bfloat16, 16, 128), (torch.float16, 32, 64)])
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


@pytest.mark.parametrize("dtype,with_residual,hidden", [
    (torch.bfloat16, True, 4096), (torch.bfloat16, False, 5120), (torch.float16, True, 5120),
    (torch.float16, False, 4096), (torch.float32, True, 4096)])
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


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)])
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
    # (not bit-identical in 16-bit: the GPU contracts the rotation's mul+add into FMAs, 1 ulp apart)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(500, 2 * 14336, dtype=dtype, device=DEV) * 4
    out = activation.silu_and_mul(x)
    ref = activation.silu_and_mul_ref(x)
    torch.testing.assert_close(out, ref, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL16))


# ---- fused [q/k norm +] rotary + KV write ------------------------------------------------------

@pytest.mark.parametrize("dtype,head_dim,num_q_heads,num_kv_heads,page,norm", [
    (torch.bfloat16, 128, 32, 8, 16, False), (torch.bfloat16, 128, 16, 16, 32, True),
    (torch.float16, 64, 32, 4, 32, True), (torch.float16, 128, 32, 8, 16, False)])
def test_rope_and_write_kv(dtype: torch.dtype, head_dim: int, num_q_heads: int, num_kv_heads: int, page: int,
                           norm: bool) -> None:
    """2000 tokens at real head layouts, llama3 cos/sin, scattered slots with padding (-1): the
    fused kernel against the reference and, bit for bit, against the unfused Triton kernels."""
    tokens, pool = 2000, 300
    g = torch.Generator(device=DEV).manual_seed(head_dim + num_kv_heads)
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=DEV, dtype=dtype, generator=g)
    q_end, k_end = num_q_heads * head_dim, (num_q_heads + num_kv_heads) * head_dim
    q = qkv[:, :q_end].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_end:k_end].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, k_end:].view(tokens, num_kv_heads, head_dim)
    cache = _llama3_cos_sin(head_dim, 32768)
    positions = torch.randint(0, 32768, (tokens,), device=DEV, generator=g)
    slots = torch.randperm(pool * page, device=DEV, generator=g)[:tokens]
    slots[torch.randperm(tokens, device=DEV, generator=g)[:50]] = -1
    k_cache = torch.randn(pool, page, num_kv_heads, head_dim, device=DEV, dtype=dtype, generator=g)
    v_cache = torch.randn_like(k_cache)
    qw = (1 + 0.2 * torch.randn(head_dim, device=DEV, generator=g)).to(dtype) if norm else None
    kw = (1 + 0.2 * torch.randn(head_dim, device=DEV, generator=g)).to(dtype) if norm else None

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref, _ = rope_kv_write.rope_and_write_kv_ref(q.clone(), k, v, positions, cache, k_ref, v_ref, slots, qw, kw)
    k_unf, v_unf = k_cache.clone(), v_cache.clone()  # the unfused Triton kernels, as the model ran before
    q_u, k_u = (rmsnorm.rms_norm(q, qw, 1e-6)[0], rmsnorm.rms_norm(k, kw, 1e-6)[0]) if norm else (q.clone(), k.clone())
    q_u, k_u = rotary.apply_rotary(q_u, k_u, positions, cache)
    kv_write.write_kv(k_u, v, k_unf, v_unf, slots)

    q_out = rope_kv_write.rope_and_write_kv(q, k, v, positions, cache, k_cache, v_cache, slots, qw, kw)
    assert q_out.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(q_out, q_ref, **TOL16)
    torch.testing.assert_close(k_cache, k_ref, **TOL16)
    assert torch.equal(v_cache, v_ref)
    if norm:  # the variance is summed in another order than rms_norm's: rare 1-ulp differences
        assert (q_out != q_u).float().mean() < 0.01 and (k_cache != k_unf).float().mean() < 0.01
    else:
        assert torch.equal(q_out, q_u) and torch.equal(k_cache, k_unf)


# ---- GEMV / skinny GEMM -------------------------------------------------------------------------

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
        cos_sin = _llama3_cos_sin(d, 4096)

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
