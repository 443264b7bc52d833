"""GPU: output logprobs streamed by session turns and Generate over gRPC (SamplingParams.logprobs), through
CUDA graphs, async scheduling and speculation, where the CPU suite cannot reach: each token's entry comes
once, in order, with the CPU engine's numbers for the same prompt on the same fp32 weights (the session's
second turn runs on its resident pages). Run with `pytest -m gpu`."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch

from agentserve.adapters.client import AgentClient
from agentserve.sampling_params import SamplingParams
from agentserve.service import agent_pb2 as pb
from agentserve.testing import tiny_model_cached
from conftest_grpc import SYSTEM, make_engine, reference_llm, run_with_client

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOP = 2


def _entries(events: list[Any]) -> list[pb.PositionLogprobs]:
    return [e for ev in events if ev.WhichOneof("event") in ("text", "reasoning")
            for e in getattr(ev, ev.WhichOneof("event")).logprobs]


def _assert_like_cpu(entries: list[pb.PositionLogprobs], prompt_ids: list[int], max_tokens: int) -> None:
    ref = reference_llm("qwen2").generate([prompt_ids], SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP))[0].outputs[0]
    assert ref.logprobs is not None
    assert [e.sampled.token_id for e in entries] == list(ref.token_ids)
    for entry, tid, position in zip(entries, ref.token_ids, ref.logprobs):
        assert math.isclose(entry.sampled.logprob, position[tid].logprob, abs_tol=2e-3), (entry, position)
        assert len(entry.top) == TOP and entry.top[0].token_id == tid


@pytest.mark.parametrize("spec", [None, "self"])
def test_turn_and_generate_logprobs_match_the_cpu_engine(spec: Optional[str]) -> None:
    draft = dict(draft_model=str(tiny_model_cached("qwen2")), num_speculative_tokens=3, spec_dynamic=False) \
        if spec else {}
    aeng = make_engine(device="cuda", dtype="float32", num_blocks=256, max_model_len=512, async_scheduling=True, **draft)

    try:
        run_with_client(aeng, _check, timeout=600.0)
        if spec:
            assert aeng.engine.metrics.spec_num_draft_tokens > 0
    finally:
        aeng.shutdown()


async def _check(client: AgentClient) -> None:
    session = await client.create_session([SYSTEM])
    for text in ("Hello there.", "And then?"):
        turn = await session.run_turn([{"role": "user", "content": text}], temperature=0.0, max_tokens=16,
                                      ignore_eos=True, logprobs=TOP, return_token_ids=True)
        _assert_like_cpu(_entries(turn.events), list(turn.done.prompt_token_ids), 16)
    prompt = [5, 17, 42, 99, 7, 5, 17, 42]
    events = [ev async for ev in client.generate(prompt_token_ids=prompt, max_tokens=16, temperature=0.0,
                                                  ignore_eos=True, logprobs=TOP)]
    _assert_like_cpu(_entries(events), prompt, 16)
