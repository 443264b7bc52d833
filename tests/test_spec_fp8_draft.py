"""An FP8 draft model (issue #15 with #12): `draft_quantization="fp8"` quantizes the draft's weights at
load whatever the target is, and a pre-quantized FP8 draft checkpoint is served in its own scheme. The
target's greedy outputs stay exactly those without speculation (the draft only proposes), and the
target as its own FP8 draft is accepted almost always (FP8 rounding flips only near-ties)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels.fp8_utils import FP8_DTYPE
from agentserve.llm import LLM
from agentserve.model.fp8_lm_head import Fp8LMHeadMethod, quantize_lm_head
from agentserve.model.embedding import ParallelLMHead
from agentserve.testing import tiny_model_cached
from helpers.fp8_checkpoints import channel_quantizer, compressed_tensors_config, write_checkpoints

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 11, 12], [21, 22, 23, 24, 25, 26, 27], [40, 41, 40, 41, 40]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, num_blocks=64, block_size=4)


def _tokens(llm: LLM) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)]


def _draft_weight_dtype(llm: LLM) -> torch.dtype:
    draft = llm.engine.runner.draft
    assert draft is not None
    return draft.model.layers[0].self_attn.qkv_proj.weight.dtype


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_online_fp8_draft_keeps_the_targets_greedy_tokens(arch: str) -> None:
    path = str(tiny_model_cached(arch))
    with LLM(path, **ENGINE) as plain:
        want = _tokens(plain)
    with LLM(path, draft_model=path, draft_quantization="fp8", spec_dynamic=False, num_speculative_tokens=3,
             **ENGINE) as llm:
        assert _draft_weight_dtype(llm) == FP8_DTYPE
        draft_head = llm.engine.runner.draft.model.lm_head  # type: ignore[union-attr]
        assert isinstance(draft_head.quant_method, Fp8LMHeadMethod) and draft_head.weight_fp8.dtype == FP8_DTYPE
        target = llm.engine.runner.model
        assert target.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32  # the target as it is
        assert not isinstance(target.lm_head.quant_method, Fp8LMHeadMethod)
        assert _tokens(llm) == want
        m = llm.engine.metrics
        # The FP8 copy of the target proposes; on random tiny weights some near-ties flip.
        assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens / m.spec_num_draft_tokens > 0.5


def test_fp8_target_with_a_16_bit_draft() -> None:
    path = str(tiny_model_cached("llama"))
    with LLM(path, quantization="fp8", **ENGINE) as plain:
        want = _tokens(plain)
    with LLM(path, quantization="fp8", draft_model=path, spec_dynamic=False, **ENGINE) as llm:
        assert _draft_weight_dtype(llm) == torch.float32
        assert llm.engine.runner.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
        assert _tokens(llm) == want
        assert llm.engine.metrics.spec_num_draft_tokens > 0


def test_prequantized_fp8_draft_checkpoint(tmp_path: Path) -> None:
    src = tiny_model_cached("llama")
    dynamic_token = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    fp8_dir, _ = write_checkpoints(src, tmp_path / "ckpt", channel_quantizer(torch.float32),
                                   compressed_tensors_config("channel", dynamic_token))
    with LLM(str(src), **ENGINE) as plain:
        want = _tokens(plain)
    with LLM(str(src), draft_model=str(fp8_dir), spec_dynamic=False, **ENGINE) as llm:
        assert _draft_weight_dtype(llm) == FP8_DTYPE
        assert _tokens(llm) == want
        assert llm.engine.metrics.spec_num_draft_tokens > 0


def test_draft_quantization_needs_a_draft_model() -> None:
    with pytest.raises(ValueError, match="draft_quantization"):
        LLM(str(tiny_model_cached("llama")), device="cpu", draft_quantization="fp8")
    with pytest.raises(ValueError, match="draft_quantization"):
        LLM(str(tiny_model_cached("llama")), device="cpu", draft_model=str(tiny_model_cached("llama")),
            draft_quantization="int4")


def test_fp8_lm_head_logits_within_e4m3_rounding() -> None:
    torch.manual_seed(0)
    head = ParallelLMHead(300, 64)
    head.weight.data.copy_(torch.randn(300, 64))
    hidden = torch.randn(5, 64)
    exact = head.compute_logits(hidden)
    quantize_lm_head(head)
    fp8 = head.compute_logits(hidden)
    assert fp8.shape == exact.shape and not torch.equal(fp8, exact)
    # Per-row e4m3 weights: ~2^-4 relative error per weight, averaging out over the 64-term dot products.
    assert float((fp8 - exact).abs().max()) < 0.05 * float(exact.abs().max())
    with pytest.raises(ValueError, match="never sharded"):
        quantize_lm_head(ParallelLMHead(300, 64, tp_size=2, tp_rank=0, all_gather=lambda t: t))
