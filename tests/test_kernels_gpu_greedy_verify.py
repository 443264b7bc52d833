"""GPU (`pytest -m gpu`): greedy verification in one kernel (kernels/greedy_verify.py) against its reference
on ragged rows, and greedy outputs with speculation (a small draft, fp32, through the verification graphs)
unchanged with it on."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels import greedy_verify as gv
from agentserve.llm import LLM
from agentserve.spec.metadata import SpecDecodeMetadata
from agentserve.testing import tiny_model_cached
from helpers.gpu_kernels import DEV, GPU_SKIPS
from helpers.spec_models import small_draft

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


@pytest.fixture
def restore_flag() -> Iterator[None]:
    before = gv.GREEDY_VERIFY
    yield
    gv.set_greedy_verify(before)


@pytest.mark.parametrize("synthetic", [False, True])
def test_kernel_matches_its_reference(synthetic: bool) -> None:
    drafts = [[3, 4, 5, 6], [], [7], [8, 9, 10], [11, 12, 13, 14]]
    spec = SpecDecodeMetadata.build(drafts, torch.device(DEV))
    greedy = torch.tensor([3, 4, 0, 6, 9, 1, 7, 2, 8, 1, 10, 5, 11, 12, 13, 14, 15], device=DEV)
    flags = torch.rand(spec.total_num_draft_tokens, device=DEV) < 0.6 if synthetic else None
    args = (greedy, spec.draft_token_ids, flags, spec.first_logits_indices, spec.num_draft_tokens_tensor,
            spec.cu_num_draft_tokens, spec.max_spec_len + 1)
    out, accepted = gv.greedy_verify_triton(*args)
    want_out, want_accepted = gv.greedy_verify_ref(*args)
    assert out.tolist() == want_out.tolist() and accepted.tolist() == want_accepted.tolist()


def test_greedy_outputs_with_speculation_unchanged(restore_flag: None) -> None:
    prompts = [[5, 6, 7, 8, 9, 10, 11 + i, 12] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=512, gpu_memory_utilization=0.3)
    path = str(tiny_model_cached("llama"))
    with LLM(path, **kw) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    gv.set_greedy_verify(True)
    with LLM(path, draft_model=small_draft("llama"), spec_dynamic=False, **kw) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        assert llm.engine.metrics.spec_num_draft_tokens > 0
