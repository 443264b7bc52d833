"""GPU: the engine against transformers in bf16, and the Triton path (with CUDA graphs) against
the torch reference path, greedy, on the tiny models. Run with `pytest -m gpu`."""

from __future__ import annotations

import functools

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels import set_backend
from agentserve.llm import LLM
from agentserve.testing import ARCHS, tiny_model_cached
from helpers.logprobs_close import assert_close_greedy, greedy_result, hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, a small robot named",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time there lived a king who had three daughters, and the youngest of them was so "
    "beautiful that the sun itself, which has seen so much, was astonished whenever it shone",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)

Result = tuple[list[list[int]], list[list[dict[int, float]]]]


@functools.lru_cache(maxsize=None)
def generate(arch: str, dtype: str, backend: str, **kw: object) -> Result:
    """Cached: several tests compare against the same run (engine builds capture CUDA graphs)."""
    set_backend(backend)
    try:
        llm = LLM(str(tiny_model_cached(arch)), device="cuda", dtype=dtype, attention_backend=backend,
                  max_model_len=1024, gpu_memory_utilization=0.3, **{"max_num_seqs": 8, **kw})
        outs = llm.generate(PROMPTS, PARAMS)
        assert (llm.engine.runner.graphs is not None) == (backend != "torch")
        del llm
        return greedy_result(outs)
    finally:
        set_backend("auto")
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=None)
def hf_generate(arch: str, dtype: torch.dtype) -> Result:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_cached(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    ids, lps = [], []
    for text in PROMPTS:
        tokens, steps = hf_greedy(model, tok.encode(text), 32)
        ids.append(tokens)
        lps.append(steps)
    return ids, lps


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_path_matches_torch_reference_fp32(arch: str) -> None:
    ref = generate(arch, "float32", "torch")
    fast = generate(arch, "float32", "triton")
    assert fast[0] == ref[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_path_matches_torch_reference_bf16(arch: str) -> None:
    ref = generate(arch, "bfloat16", "torch")
    fast = generate(arch, "bfloat16", "triton")
    exact = sum(a == b for a, b in zip(ref[0], fast[0]))
    print(f"{arch} bf16: {exact}/{len(PROMPTS)} sequences identical")
    assert_close_greedy(ref, fast, f"{arch} bf16 triton vs torch")


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_path_with_tiny_chunks_and_prefix_cache(arch: str) -> None:
    ref = generate(arch, "float32", "torch")
    chunked = generate(arch, "float32", "triton", max_num_batched_tokens=7, max_num_seqs=4, block_size=32)
    assert chunked[0] == ref[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_matches_transformers(arch: str) -> None:
    # min_new_tokens keeps HF from stopping at EOS; the tiny models almost never emit it greedily.
    ref = hf_generate(arch, torch.bfloat16)
    ours = generate(arch, "bfloat16", "triton")
    exact = sum(a == b for a, b in zip(ref[0], ours[0]))
    print(f"{arch} bf16 vs HF: {exact}/{len(PROMPTS)} sequences identical")
    assert_close_greedy(ref, ours, f"{arch} bf16 vs transformers")


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_matches_transformers_on_gpu(arch: str) -> None:
    ref = hf_generate(arch, torch.float32)
    ours = generate(arch, "float32", "triton")
    assert ours[0] == ref[0]


def test_swap_round_trip_is_exact_and_asynchronous() -> None:
    # Pinned swap space, copies queued on the stream: pages swapped out, overwritten, and swapped
    # back into other pages read back bit-exact (runs of consecutive slots and scattered ones).
    from agentserve.cache.kv_cache import KVCache

    torch.manual_seed(0)
    cache = KVCache(num_layers=3, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                    device=torch.device("cuda"), num_swap_blocks=40)
    cache.pages_per_copy = 3  # several pieces per swap
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    pages, slots, back = [5, 9, 10, 11, 40, 2, 63], [0, 1, 2, 3, 4, 20, 39], [1, 3, 7, 8, 50, 51, 52]
    before = [(k[pages].clone(), v[pages].clone()) for k, v in cache.layers]
    cache.swap_out(pages, slots)
    for k, v in cache.layers:  # the freed pages are rewritten by later work on the stream
        k.zero_()
        v.zero_()
    cache.swap_in(slots, back)
    torch.cuda.synchronize()
    for (k, v), (k0, v0) in zip(cache.layers, before):
        assert torch.equal(k[back], k0) and torch.equal(v[back], v0)


def test_unified_kernel_warmup_covers_the_variants_a_step_selects() -> None:
    # Every (tile, batch-lookup) pair a step can pick is compiled up front: 3 tile shapes for
    # GQA 4 in bf16 (16- and 32-row decode / verification tiles, the 64-row prefill tile) x 3 lookup
    # widths up to 256 requests.
    from agentserve.kernels.paged_attention import attention_config, batch_block, warmup_unified_variants

    k = torch.zeros((8, 16, 8, 128), dtype=torch.bfloat16, device="cuda")
    launched = warmup_unified_variants(k, torch.zeros_like(k), 32, torch.bfloat16, 256, 8192)
    tiles = {attention_config(128, 4, m, torch.bfloat16) for m in (1, 2, 8, 16, 32, 512, 8192)}
    assert launched == len(tiles) * len({batch_block(b) for b in range(1, 257)}) == 9


def test_auto_dtype_serves_a_float32_checkpoint_in_bfloat16() -> None:
    """vLLM's dtype 'auto' on a GPU: the tiny models are saved in float32 and run in bfloat16, KV pages too."""
    with LLM(str(tiny_model_cached("llama3")), device="cuda", max_model_len=256, num_blocks=64) as llm:
        assert llm.engine.runner.model.embed_tokens.weight.dtype == torch.bfloat16
        assert llm.engine.dtype == torch.bfloat16
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 8
