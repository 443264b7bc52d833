"""KV write, RMSNorm(+residual), rotary and SiLU-and-mul: Triton kernels against the references.

Runs the kernels in Triton's interpreter on CPU (tiny shapes); see test_kernels_attention.py for
why bf16 is left to the GPU tests and why the *_triton functions are called directly."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import activation, kv_write, rmsnorm, rotary  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(rmsnorm._rms_norm_kernel)

DTYPES = [torch.float32, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [4, 16])
def test_write_kv(dtype: torch.dtype, page_size: int) -> None:
    g = _gen(page_size)
    num_blocks, num_heads, head_dim, tokens = 7, 3, 16, 9
    # key/value as strided views of a fused qkv output; slots scattered, -1 = padding.
    fused = torch.randn(tokens, (4 + 2 * num_heads) * head_dim, generator=g).to(dtype)
    key = fused[:, 4 * head_dim:(4 + num_heads) * head_dim].view(tokens, num_heads, head_dim)
    value = fused[:, (4 + num_heads) * head_dim:].view(tokens, num_heads, head_dim)
    slots = torch.randperm(num_blocks * page_size, generator=g)[:tokens]
    slots[[2, 5]] = -1
    k_cache = torch.randn(num_blocks, page_size, num_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page_size, num_heads, head_dim, generator=g).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_write.write_kv_ref(key, value, k_ref, v_ref, slots)
    kv_write.write_kv_triton(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_casts_to_cache_dtype() -> None:
    g = _gen(1)
    key, value = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    k_cache = torch.randn(3, 4, 2, 16, generator=g).half()
    v_cache = torch.randn(3, 4, 2, 16, generator=g).half()
    slots = torch.tensor([0, 11, -1, 4, 7])
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_write.write_kv_ref(key, value, k_ref, v_ref, slots)
    kv_write.write_kv_triton(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [48, 64])
def test_rms_norm(dtype: torch.dtype, with_residual: bool, hidden: int) -> None:
    g = _gen(hidden)
    x = (torch.randn(6, hidden, generator=g) * 3).to(dtype)
    residual = torch.randn(6, hidden, generator=g).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    x_before = x.clone()
    out_ref, res_ref = rmsnorm.rms_norm_ref(x, weight, 1e-6, residual)
    out, res = rmsnorm.rms_norm_triton(x, weight, 1e-6, residual)
    assert out.dtype == out_ref.dtype and res.dtype == res_ref.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, out_ref, **tol)
    assert torch.equal(res, res_ref)  # the residual sum is one rounded add: exact
    assert torch.equal(x, x_before)  # inputs are not modified
    if not with_residual:
        assert res is x


def test_rms_norm_fp32_weight_promotes_and_3d_strided_heads() -> None:
    g = _gen(2)
    # Per-head q norm (Qwen3) on a strided [T, H, D] view of a fused projection.
    fused = torch.randn(5, 3 * 32 + 16, generator=g).half()
    q = fused[:, : 3 * 32].view(5, 3, 32)
    weight = 1 + 0.1 * torch.randn(32, generator=g)  # fp32 weight, fp16 activations -> fp32 output
    out_ref, _ = rmsnorm.rms_norm_ref(q, weight, 1e-5)
    out, res = rmsnorm.rms_norm_triton(q, weight, 1e-5)
    assert out.shape == q.shape and out.dtype == torch.float32 and res is q
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


def _cos_sin_cache(head_dim: int, max_pos: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rotary(dtype: torch.dtype, head_dim: int) -> None:
    g = _gen(head_dim)
    tokens, hq, hkv = 7, 4, 2
    fused = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=g).to(dtype)
    q = fused[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = fused[:, hq * head_dim:(hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    positions = torch.randint(0, 500, (tokens,), generator=g)
    cache = _cos_sin_cache(head_dim, 512)
    q_ref, k_ref = rotary.apply_rotary_ref(q, k, positions, cache)

    q_copy, k_copy = q.clone(), k.clone()
    q_out, k_out = rotary.apply_rotary_triton(q, k, positions, cache, inplace=False)
    assert torch.equal(q, q_copy) and torch.equal(k, k_copy)
    # Same rounding steps as the reference: equal up to fp32 FMA contraction on the GPU; the
    # interpreter does not contract, so here the results are identical.
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-6, rtol=0)

    q_in, k_in = rotary.apply_rotary_triton(q, k, positions, cache)  # in place, into `fused`
    assert q_in.data_ptr() == q.data_ptr() and k_in.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [40, 1100])  # 1100 > one 1024-column block: a masked second block
def test_silu_and_mul(dtype: torch.dtype, inter: int) -> None:
    g = _gen(inter)
    x = (torch.randn(2, 3, 2 * inter, generator=g) * 4).to(dtype)
    out = activation.silu_and_mul_triton(x)
    ref = activation.silu_and_mul_ref(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(out, ref, **tol)


def test_dispatchers_use_reference_on_cpu() -> None:
    g = _gen(9)
    x = torch.randn(3, 32, generator=g)
    assert torch.equal(activation.silu_and_mul(x), activation.silu_and_mul_ref(x))
    w = torch.randn(32, generator=g)
    assert torch.equal(rmsnorm.rms_norm(x, w, 1e-6)[0], rmsnorm.rms_norm_ref(x, w, 1e-6)[0])
