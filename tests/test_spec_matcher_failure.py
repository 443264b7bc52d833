"""A request whose output-constraint matcher fails (a backend limit: llguidance raising on a fill or a
token) fails alone under speculation too, as without it: the proposers (the draft model under a copy of
the matcher, n-gram lookup cut to the prefix the matcher accepts) used to let the exception out of
Engine.step, which failed the whole offline batch (and, in the server, every request in flight). The
other requests' outputs stay exactly those of the engine without speculation."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import pytest
import torch

from agentserve import SamplingParams
from agentserve.engine import constraints
from agentserve.grammar.interface import GrammarError, GrammarMatcher
from agentserve.grammar.reasoning import ReasoningMarkers
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

ARCH = "qwen2"
ENGINE = dict(device="cpu", dtype="float32", num_blocks=128, max_model_len=128)
POISONED_PROMPT = "Repeat: ab ab ab ab ab ab"
PROMPTS = [POISONED_PROMPT, "Hello hello hello hello", "Answer:"]
SCHEMA = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
PARAMS = [SamplingParams(regex="(ab)+c", temperature=0.0, max_tokens=24),
          SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
          SamplingParams(json_schema=SCHEMA, temperature=0.0, max_tokens=24)]
FAIL_AFTER = 3  # tokens the poisoned matcher takes before its backend fails


class FailingMatcher(GrammarMatcher):
    """The inner matcher until it holds FAIL_AFTER tokens; then its `mode` ("fill" or "accept") raises, as
    a backend that reached one of its limits does. Copies (the draft's) fail the same way."""

    def __init__(self, inner: GrammarMatcher, mode: str) -> None:
        super().__init__(inner.tokenizer_info)
        self.inner = inner
        self.mode = mode

    def _failing(self, mode: str) -> bool:
        return self.mode == mode and self.inner.num_tokens >= FAIL_AFTER

    def _accept(self, token_id: int) -> bool:
        if self._failing("accept"):
            raise GrammarError("simulated backend limit on accept")
        return self.inner.accept_token(token_id)

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self._failing("fill"):
            raise GrammarError("simulated backend limit on fill")
        self.inner.fill_bitmask(bitmask, row)

    def _rollback(self, num_tokens: int) -> None:
        self.inner.rollback(num_tokens)

    def _copy(self) -> "FailingMatcher":
        return FailingMatcher(self.inner.copy(), self.mode)

    def _is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def _cannot_continue(self) -> bool:
        return self.inner.is_terminated()


PROPOSERS: dict[str, dict[str, Any]] = {
    "draft": dict(draft_model=str(tiny_model_cached(ARCH)), num_speculative_tokens=3, spec_dynamic=False),
    "ngram": dict(speculative_method="ngram", prompt_lookup_min=1, num_speculative_tokens=3, spec_dynamic=False),
}


def outcomes(mode: str, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    original = constraints.wrap_for_reasoning

    def wrap(matcher: GrammarMatcher, markers: Optional[ReasoningMarkers], prompt_token_ids: Sequence[int],
             budget: Optional[int] = None) -> GrammarMatcher:
        wrapped = original(matcher, markers, prompt_token_ids, budget)
        return FailingMatcher(wrapped, mode) if list(prompt_token_ids) == poisoned_ids else wrapped

    llm = LLM(str(tiny_model_cached(ARCH)), **ENGINE, **spec)
    poisoned_ids = llm.engine.encode(POISONED_PROMPT)
    with monkeypatch.context() as patch:
        patch.setattr(constraints, "wrap_for_reasoning", wrap)
        outs = llm.generate(PROMPTS, PARAMS)
    llm.engine.pool.check_all_free()
    if spec:
        assert llm.engine.metrics.spec_num_draft_tokens > 0
    llm.close()
    return [(o.outputs[0].finish_reason, bool(o.error), o.outputs[0].token_ids if not o.error else None)
            for o in outs]


@pytest.mark.parametrize("mode", ["fill", "accept"])
@pytest.mark.parametrize("proposer", list(PROPOSERS))
def test_a_failing_matcher_fails_its_request_alone(proposer: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    want = outcomes(mode, {}, monkeypatch)
    assert want[0][:2] == ("error", True)  # the poisoned request does fail without speculation
    assert [w[:2] for w in want[1:]] == [("length", False), ("stop", False)]
    assert outcomes(mode, PROPOSERS[proposer], monkeypatch) == want
