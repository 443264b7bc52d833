"""GPU: the engine against transformers in bf16, and the Triton path (with CUDA graphs) against
the torch reference path, greedy, on the tiny models. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels import set_backend
from agentserve.llm import LLM
from agentserve.testing import ARCHS, tiny_model_cached

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, a small robot named",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time there lived a king who had three daughters, and the youngest of them was so "
    "beautiful that the sun itself, which has seen so much, was astonished whenever it shone",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def generate(arch: str, dtype: str, backend: str, **kw: object) -> list[list[int]]:
    set_backend(backend)
    try:
        llm = LLM(str(tiny_model_cached(arch)), device="cuda", dtype=dtype, attention_backend=backend,
                  max_num_seqs=8, gpu_memory_utilization=0.3, **kw)
        outs = llm.generate(PROMPTS, PARAMS)
        assert llm.engine.runner.graphs is not None or backend == "torch"
        return [o.outputs[0].token_ids for o in outs]
    finally:
        set_backend("auto")


def hf_generate(arch: str, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_cached(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    outs = []
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32)
        outs.append(gen[0, len(ids):].tolist())
    return outs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_path_matches_torch_reference(arch: str, dtype: str) -> None:
    ref = generate(arch, dtype, "torch")
    fast = generate(arch, dtype, "triton")
    assert fast == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_path_with_tiny_chunks_and_prefix_cache(arch: str) -> None:
    ref = generate(arch, "float32", "torch")
    chunked = generate(arch, "float32", "triton", max_num_batched_tokens=7, block_size=32)
    assert chunked == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_matches_transformers(arch: str) -> None:
    # min_new_tokens keeps HF from stopping at EOS; the tiny models almost never emit it greedily.
    ref = hf_generate(arch, torch.bfloat16)
    ours = generate(arch, "bfloat16", "triton")
    assert ours == ref
