"""GPU tests of the elementwise kernels at real shapes (run with `pytest -m gpu`; skipped without
CUDA): rms_norm(+residual), silu_and_mul, rotary with Llama-3.1's rope, write_kv into scattered
pages with padded slots, the fused [q/k norm +] rotary + KV write, and CUDA-graph capture/replay.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import activation, kv_write, rmsnorm, rope_kv_write, rotary  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS, LOW, TOL16, TOL32, llama3_cos_sin  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


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


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)])
def test_rotary_llama3(dtype: torch.dtype, head_dim: int) -> None:
    tokens, hq, hkv = 2000, 32, 8
    fused = torch.randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=DEV)
    q = fused[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = fused[:, hq * head_dim:(hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    cache = llama3_cos_sin(head_dim, 32768)
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
    cache = llama3_cos_sin(head_dim, 32768)
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
