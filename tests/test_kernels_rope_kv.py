"""Fused [q/k RMSNorm +] rotary + paged KV write against the torch reference, in Triton's
interpreter on CPU (tiny shapes). GPU shapes: tests/test_kernels_gpu_elementwise.py.

The interpreter truncates fp32->bf16 casts instead of rounding to nearest, so bf16 is compared
with a tolerance of a few ulps here; fp32/fp16 without the norm are bit-exact (same rounding steps
as the reference), with the norm they differ only through the variance's summation order."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import rope_kv_write as rkv  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(rkv._rope_kv_write_kernel)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_case(tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
              norm: bool, seed: int, device: str = "cpu") -> dict:
    """q/k/v as strided views of one fused qkv output (as the model has them), scattered slots with
    two padding entries (-1), a random-angle cos/sin table, caches full of random values."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype).to(device)
    q_end, k_end = num_q_heads * head_dim, (num_q_heads + num_kv_heads) * head_dim
    max_pos = 300
    angles = torch.rand(max_pos, head_dim // 2, generator=g) * 6.3
    num_blocks = tokens // page + 4
    slots = torch.randperm(num_blocks * page, generator=g)[:tokens]
    slots[torch.randperm(tokens, generator=g)[:2]] = -1
    weight = (lambda: (1 + 0.2 * torch.randn(head_dim, generator=g)).to(dtype).to(device)) if norm else (lambda: None)
    return dict(
        q=qkv[:, :q_end].view(tokens, num_q_heads, head_dim),
        k=qkv[:, q_end:k_end].view(tokens, num_kv_heads, head_dim),
        v=qkv[:, k_end:].view(tokens, num_kv_heads, head_dim),
        positions=torch.randint(0, max_pos, (tokens,), generator=g).to(device),
        cos_sin_cache=torch.cat([angles.cos(), angles.sin()], dim=-1).to(device),
        k_cache=torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g).to(dtype).to(device),
        v_cache=torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g).to(dtype).to(device),
        slot_mapping=slots.to(device), q_norm_weight=weight(), k_norm_weight=weight(), eps=1e-6,
    )


def check_against_reference(case: dict, run: "callable", dtype: torch.dtype) -> None:
    """Runs `run(**case)` (which may rotate q in place) and the reference on copies; compares q,
    every cache slot (written ones close to the reference, all others untouched) and v exactly."""
    ref = {**case, "q": case["q"].clone(), "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    k_before, v_before = case["k"].clone(), case["v"].clone()
    q_ref, _ = rkv.rope_and_write_kv_ref(**ref)
    q_out = run(**case)
    tol = TOL[dtype]
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(case["k_cache"], ref["k_cache"], **tol)  # also covers untouched slots
    assert torch.equal(case["v_cache"], ref["v_cache"])  # v is copied, never rounded
    assert torch.equal(case["k"], k_before) and torch.equal(case["v"], v_before)
    exact = dtype == torch.float16 or (dtype == torch.float32 and case["q_norm_weight"] is None)
    if exact:
        assert torch.equal(q_out, q_ref) and torch.equal(case["k_cache"], ref["k_cache"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group,num_kv_heads,page", [(1, 2, 16), (4, 2, 32), (8, 1, 16)])
@pytest.mark.parametrize("norm", [False, True])
def test_fused_matches_reference(dtype: torch.dtype, head_dim: int, group: int, num_kv_heads: int, page: int,
                                 norm: bool) -> None:
    case = make_case(7, group * num_kv_heads, num_kv_heads, head_dim, page, dtype, norm, seed=head_dim + group)
    q = case["q"]
    check_against_reference(case, rkv.rope_and_write_kv_triton, dtype)
    assert case["q"].data_ptr() == q.data_ptr()  # rotated in place, in the qkv buffer


def test_padding_only_and_empty_batches() -> None:
    case = make_case(3, 4, 2, 64, 16, torch.float32, False, seed=5)
    case["slot_mapping"][:] = -1
    k_cache = case["k_cache"].clone()
    check_against_reference(case, rkv.rope_and_write_kv_triton, torch.float32)
    assert torch.equal(case["k_cache"], k_cache)
    empty = make_case(2, 4, 2, 64, 16, torch.float32, False, seed=6)
    for key in ("q", "k", "v", "positions", "slot_mapping"):
        empty[key] = empty[key][:0]
    assert rkv.rope_and_write_kv_triton(**empty).shape == (0, 4, 64)


def test_cache_dtype_cast_and_rejects_bad_shapes() -> None:
    case = make_case(4, 4, 2, 64, 16, torch.float32, False, seed=7)
    case["k_cache"], case["v_cache"] = case["k_cache"].half(), case["v_cache"].half()
    check_against_reference(case, rkv.rope_and_write_kv_triton, torch.float16)
    bad = make_case(4, 4, 2, 64, 16, torch.float32, True, seed=8)
    bad["k_norm_weight"] = None
    with pytest.raises(ValueError):
        rkv.rope_and_write_kv_triton(**bad)


def test_dispatcher_on_cpu_uses_reference() -> None:
    case = make_case(5, 8, 2, 64, 16, torch.float32, True, seed=9)
    check_against_reference(case, rkv.rope_and_write_kv, torch.float32)
