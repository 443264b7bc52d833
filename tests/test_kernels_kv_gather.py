"""The pages-to-query-heads gather of the first-chunk SDPA prefill (kernels/kv_gather.py) against the
reference path (index_select then repeat_interleave) in Triton's interpreter: grouped-query head
counts, scattered slots with unwritten (-1) ones, fp32 / fp16 pages, fp8 pages with the layer's
scales, a head size that is not a power of two."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import kv_gather  # noqa: E402
from agentserve.kernels.fp8_utils import quantize_kv_ref  # noqa: E402
from agentserve.model.prefill_sdpa import _gather  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(kv_gather._gather_expand_kernel)


def reference(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, hq: int, dtype: torch.dtype,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = _gather(k_cache, slots, k_scale, dtype), _gather(v_cache, slots, v_scale, dtype)
    group = hq // k.shape[1]
    return k.transpose(0, 1).repeat_interleave(group, dim=0), v.transpose(0, 1).repeat_interleave(group, dim=0)


@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 2, 16), (8, 8, 32), (6, 1, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_gather_then_repeat(hq: int, hkv: int, head_dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hq * 100 + head_dim)
    blocks, page, tokens = 9, 8, 45  # 45 tokens: two blocks of 32, the second ragged
    k_cache = torch.randn(blocks, page, hkv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(blocks, page, hkv, head_dim, generator=g).to(dtype)
    slots = torch.randperm(blocks * page, generator=g)[:tokens]
    slots[[3, 40]] = -1  # unwritten: read slot 0, as the reference does
    got = kv_gather.gather_expand_triton(k_cache, v_cache, slots, hq, dtype)
    want = reference(k_cache, v_cache, slots, hq, dtype)
    assert got[0].shape == (hq, tokens, head_dim)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fp8_pages_dequantized_with_the_layer_scales() -> None:
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(6, 16, 2, 32, generator=g), torch.randn(6, 16, 2, 32, generator=g)
    k_scale, v_scale = torch.tensor([0.02]), torch.tensor([0.015])
    k8, v8 = quantize_kv_ref(k_cache, k_scale), quantize_kv_ref(v_cache, v_scale)
    slots = torch.arange(37)
    got = kv_gather.gather_expand_triton(k8, v8, slots, 8, torch.float32, k_scale, v_scale)
    want = reference(k8, v8, slots, 8, torch.float32, k_scale, v_scale)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
