"""GPU: tensor parallelism over NCCL on two GPUs of one host. Greedy outputs at tensor_parallel_size=2
are those of one GPU on the tiny models (bf16: the sums run in another order, so the tokens are
compared on short outputs where bf16 ties are unlikely), each rank holds half the KV heads, and
close() frees the second GPU. Run with `pytest -m gpu`; skipped unless two GPUs are visible."""

from __future__ import annotations

import os

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.parallel.driver import TensorParallelDriver
from agentserve.testing import ARCHS, tiny_model_cached

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices")]

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [8, 9, 10, 11] * 6, [300, 301, 5] * 9 + [7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = dict(dtype="float32", gpu_memory_utilization=0.3)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_gpus_give_the_one_gpu_greedy_tokens(arch: str) -> None:
    path = str(tiny_model_cached(arch))
    with LLM(path, **ENGINE) as llm:
        one = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM(path, **ENGINE, tensor_parallel_size=2) as llm:
        two = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        driver = llm.engine.runner.parallel
        assert isinstance(driver, TensorParallelDriver)
        assert llm.engine.runner.kv_heads_per_rank == llm.engine.arch.num_kv_heads // 2
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"
        workers = driver.processes
    assert two == one
    assert [p.exitcode for p in workers] == [0]


def test_dummy_8b_shape_runs_at_tp2() -> None:
    with LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=1024,
             tensor_parallel_size=2) as llm:
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 16
        # Half of the 8 KV heads per rank: each rank's KV pool holds pages of 4 heads.
        assert llm.engine.runner.kv_cache.layers[0][0].shape[2] == 4
