"""GPU (`pytest -m gpu`): split-KV at full grids for long contexts (kernels/paged_attention.SPLIT_LONG) in
an engine: decode CUDA graphs captured per context bucket with the extra split counts, a batch whose
grid already fills the SMs, ragged contexts; greedy tokens and logprobs against the engine without it,
by vLLM's logprobs-close rule. The thresholds are lowered to the tiny model's 2 kv heads and 4k
positions (the kernel and the graphs' bucketing are what is exercised, not the tuning)."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels import paged_attention as pa
from agentserve.kernels._triton_utils import num_sms
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.logprobs_close import assert_close_greedy, greedy_result

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_engine_with_split_long_is_logprobs_close(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = num_sms(torch.device("cuda")) // 2 + 6  # x 2 kv heads: past one full wave of programs
    prompts = [[3 + (11 * i + 7 * j) % 1000 for j in range(600 + (37 * i) % 400)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    monkeypatch.setattr(pa, "SPLIT_LONG_MIN_CONTEXT", 512)
    monkeypatch.setattr(pa, "SPLIT_LONG_MIN_KEYS", 128)
    monkeypatch.setattr(pa, "SPLIT_LONG", False)  # the reference run: split-long is on by default
    assert pa.num_kv_splits(batch, 2048, 2, num_sms(torch.device("cuda"))) == 1  # off: one program per head

    def run() -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        with LLM(str(tiny_model_cached("llama3")), device="cuda", dtype="bfloat16", max_num_seqs=batch,
                 max_model_len=2048, max_num_batched_tokens=8192, gpu_memory_utilization=0.3) as llm:
            return greedy_result(llm.generate(prompts, params))

    want = run()
    monkeypatch.setattr(pa, "SPLIT_LONG", True)
    assert pa.num_kv_splits(batch, 2048, 2, num_sms(torch.device("cuda"))) > 1
    got = run()
    assert_close_greedy(want, got, "split-KV at full grids for long contexts")
