"""The one-token base GEMV with the LoRA shrink as extra rows (kernels/gemv_lora_shrink.py,
AGENTSERVE_LORA_SHRINK_IN_GEMV=1): base output and shrink against F.linear and x @ A_slot^T in
Triton's interpreter on the CPU (each fma tile family of kernels/gemv.py: K a multiple of 2048, of
512, other), a base-only token, and the whole delta through lora_expand against the reference.
Under `-m gpu`: Llama-3.1-8B shapes in bf16, and a one-stream LoRA engine with the flag against
one without (vLLM's logprobs-close rule)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import gemv_lora_shrink as gls  # noqa: E402
from agentserve.kernels import lora  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_INTERPRETED = HAS_TRITON and type(gls._gemv_lora_shrink_kernel).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(
    not _INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 set before the kernels are imported")


def _case(n: int, k: int, slices: int, rank: int, dtype: torch.dtype, seed: int, bias: bool = False) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEV)

    return dict(x=randn(1, k).to(dtype), w=(randn(n, k) / k ** 0.5).to(dtype),
                b=randn(n).to(dtype) if bias else None, a=(randn(3, slices, rank, k) / k ** 0.5).to(dtype))


def _check(case: dict, slot: int, tol: float) -> None:
    slots = torch.tensor([slot], dtype=torch.int32, device=DEV)
    y, h = gls.gemv_with_lora_shrink(case["x"], case["w"], case["b"], case["a"], slots)
    x32 = case["x"].float()
    ref_y = F.linear(x32, case["w"].float(), None if case["b"] is None else case["b"].float())
    assert y.dtype == case["x"].dtype and y.shape == ref_y.shape
    torch.testing.assert_close(y.float(), ref_y, atol=tol, rtol=tol)
    if slot >= 0:
        _, slices, rank, k = case["a"].shape
        ref_h = (x32 @ case["a"][slot].float().reshape(slices * rank, k).T).reshape(1, slices, 1, rank)
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("k", [2048, 512, 96])
@pytest.mark.parametrize("slot", [0, 2, -1])
def test_base_rows_and_shrink_rows_match_their_references(k: int, slot: int) -> None:
    # N = 40 and slices * rank = 3 * 8 = 24: neither fills whole tiles of 4 (K = 2048), 16 (512) or
    # the generic tile (96), so the clamped last rows are exercised on both sides of the grid.
    _check(_case(40, k, 3, 8, torch.float32, seed=k + slot, bias=k == 96), slot, 1e-4)


@interpreted
def test_the_delta_through_lora_expand_is_the_reference() -> None:
    n_q, n_kv, k, rank = 16, 8, 64, 4
    sizes = [n_q, n_kv, n_kv]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, generator=g)
    w = torch.randn(sum(sizes), k, generator=g) / k ** 0.5
    a = torch.randn(2, 3, rank, k, generator=g) / k ** 0.5
    b = torch.randn(2, rank, sum(sizes), generator=g) / rank ** 0.5
    ranks = torch.full((2, 3), rank, dtype=torch.int32)
    scaling = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.25, 1.0]])
    slots = torch.tensor([1], dtype=torch.int32)
    meta = lora.one_token_lora_batch_meta(slots, 2, lora.default_block_m(1))
    y, h = gls.gemv_with_lora_shrink(x, w, None, a, slots)
    lora.lora_expand(y, h, b, ranks, scaling, meta, lora.slice_starts_for(sizes, x.device))
    ref = F.linear(x, w)
    lora.add_lora_ref(ref, x, a, b, ranks, scaling, slots, sizes)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_only_one_token_on_the_fma_gemv_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.zeros(64, 2048, dtype=torch.bfloat16)
    a = torch.zeros(2, 3, 8, 2048, dtype=torch.bfloat16)
    monkeypatch.setattr(gls, "SHRINK_IN_GEMV", True)
    x = torch.zeros(1, 2048, dtype=torch.bfloat16)
    assert not gls.use_shrink_in_gemv(x, w, a)  # on the CPU the base projection is F.linear
    monkeypatch.setattr(gls, "use_triton_gemv", lambda x, w: True)
    assert gls.use_shrink_in_gemv(x, w, a)
    assert not gls.use_shrink_in_gemv(torch.zeros(2, 2048, dtype=torch.bfloat16), w, a)  # two tokens
    assert not gls.use_shrink_in_gemv(x, w, a.float())  # A in another dtype than W
    monkeypatch.setattr(gls, "SHRINK_IN_GEMV", False)
    assert not gls.use_shrink_in_gemv(x, w, a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("rank", [16, 64])
def test_llama_8b_shapes_bf16(n: int, k: int, rank: int) -> None:
    _check(_case(n, k, 3 if n == 6144 else 1, rank, torch.bfloat16, seed=n + rank), 1, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_stream_engine_with_and_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentserve import SamplingParams
    from agentserve.llm import LLM
    from agentserve.lora import layers
    from agentserve.testing import tiny_model_cached
    from helpers.calls import count_calls
    from helpers.logprobs_close import assert_close_greedy, greedy_result
    from helpers.lora import build_peft_adapter

    base = tiny_model_cached("llama3")
    adapter = build_peft_adapter(base, tmp_path / "a", seed=1, r=16, lora_alpha=32,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    def run() -> object:
        with LLM(str(base), device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=256,
                 gpu_memory_utilization=0.3, enable_lora=True, max_loras=1, max_lora_rank=16,
                 lora_modules={"a": str(adapter)}) as llm:
            prompts = [[(i * 31 + 7) % 200 + 3 for i in range(24)], [(i * 17 + 5) % 180 + 9 for i in range(40)]]
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5),
                                adapter="a")
            return greedy_result(outs)

    plain = run()
    monkeypatch.setattr(gls, "SHRINK_IN_GEMV", True)
    calls = count_calls(monkeypatch, layers, "gemv_with_lora_shrink")
    fused = run()
    assert calls[0] > 0
    assert_close_greedy(plain, fused, "LoRA shrink in the base GEMV vs separate")
