"""The GPU's speculative code paths on the CPU: benchmarks/spec_host.py puts eager stand-ins where the
CUDA graphs would be (verification and catch-up over padded inputs, draft decode replays), so the
proposal's planned inputs (spec/draft_plan.py: one copy per proposal) and the padded verification run
as on the GPU. Greedy outputs must equal those without speculation; the benchmark itself runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.spec_models import noisy_draft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import spec_host  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 11, 12][: 4 + 3 * i] + [20 + i] for i in range(4)]
# Different lengths: near their ends the rows' k are capped differently, so decode steps drop rows.
MAX_TOKENS = [9, 14, 17, 23]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=64, async_scheduling=False)


def generate(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("draft", ["self", "noisy"])
def test_graph_paths_keep_greedy_outputs(draft: str) -> None:
    target = str(tiny_model_cached("llama"))
    with LLM(target, **ENGINE) as llm:
        expected = generate(llm)
    draft_model = target if draft == "self" else noisy_draft("llama")
    with LLM(target, draft_model=draft_model, num_speculative_tokens=4, spec_dynamic=False, **ENGINE) as llm:
        spec_host.use_graph_paths(llm.engine, 4)
        assert generate(llm) == expected
        metrics = llm.engine.metrics
        assert metrics.spec_num_accepted_tokens > 0
        if draft == "self":
            # The target as its own draft proposes the target's own tokens: a proposal built from
            # wrong inputs (positions, slots, rows) would be rejected, though the output stays exact.
            assert metrics.spec_num_rejected_rows == 0
        else:
            assert metrics.spec_num_rejected_rows > 0


def test_spec_host_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "spec_host.json"
    threads = str(torch.get_num_threads())  # the benchmark sets torch's threads: keep this process's
    assert spec_host.main(["--steps", "3", "--batch", "1", "2", "--prompt-len", "8", "--threads", threads,
                           "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert 0 < row["host"] < row["step"]
        assert row["draft fwd"] > 0 and row["target fwd"] > 0


def _count_device_proposals(llm: LLM) -> list[int]:
    """Wraps the draft's propose: counts the proposals whose drafts stayed on the device."""
    draft = llm.engine.runner.draft
    assert draft is not None
    counts = [0]
    original = draft.propose

    def propose(requests: list, num_tokens: list[int], keep_on_device: bool = False) -> list:
        out = original(requests, num_tokens, keep_on_device)
        counts[0] += any(on_device is not None for _, _, on_device in out)
        return out

    draft.propose = propose  # type: ignore[method-assign]
    return counts


def _seeded(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=m, ignore_eos=True, seed=100 + i)
              for i, m in enumerate(MAX_TOKENS)]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


def test_device_resident_drafts_match_host_drafts() -> None:
    """spec/device_drafts.py: drafts left on the device into the verification give the same tokens as
    drafts read back first, greedy and seeded random (the same draws, only where the values live),
    and the path is really taken."""
    target = str(tiny_model_cached("llama"))
    with LLM(target, **ENGINE) as llm:
        expected = generate(llm)
    results = {}
    for keep in (True, False):
        with LLM(target, draft_model=noisy_draft("llama"), num_speculative_tokens=3, spec_dynamic=False,
                 **ENGINE) as llm:
            spec_host.use_graph_paths(llm.engine, 3)
            if not keep:  # the verification graphs stay; only the proposal reads its drafts back
                draft = llm.engine.runner.draft
                assert draft is not None
                host_propose = draft.propose
                draft.propose = lambda reqs, ks, keep_on_device=False: host_propose(reqs, ks, False)  # type: ignore[method-assign]
            counts = _count_device_proposals(llm)
            greedy = generate(llm)
            m = llm.engine.metrics
            # Wrong draft values would still give exact outputs (they are only rejected more often):
            # the same drafts show as the same acceptance, position by position.
            accepted = list(m.spec_accepted_per_position)
            results[keep] = (greedy, _seeded(llm), counts[0], accepted, m.spec_num_accepted_tokens)
            assert m.spec_num_rejected_rows > 0
    assert results[True][0] == results[False][0] == expected
    assert results[True][1] == results[False][1]
    assert results[True][2] > 0 and results[False][2] == 0
    assert results[True][3] == results[False][3] and results[True][4] == results[False][4]


def test_device_drafts_read_back_for_an_eager_verification() -> None:
    """A verification step that cannot replay a graph (here: more rows than the stand-in takes)
    builds its inputs on the host: the device drafts come back in one copy, outputs unchanged."""
    target = str(tiny_model_cached("llama"))
    with LLM(target, **ENGINE) as llm:
        expected = generate(llm)
    with LLM(target, draft_model=noisy_draft("llama"), num_speculative_tokens=3, spec_dynamic=False, **ENGINE) as llm:
        spec_host.use_graph_paths(llm.engine, 3)
        graphs = llm.engine.runner.verify_graphs
        assert graphs is not None
        replayable = graphs.padded_size
        graphs.padded_size = lambda bs, q: replayable(bs, q) if bs <= 2 else None  # type: ignore[method-assign]
        counts = _count_device_proposals(llm)
        assert generate(llm) == expected
        assert counts[0] > 0
        accepted = list(llm.engine.metrics.spec_accepted_per_position)
    # The same run with every verification replayed (no read-back): the same drafts were verified.
    with LLM(target, draft_model=noisy_draft("llama"), num_speculative_tokens=3, spec_dynamic=False, **ENGINE) as llm:
        spec_host.use_graph_paths(llm.engine, 3)
        assert generate(llm) == expected
        assert list(llm.engine.metrics.spec_accepted_per_position) == accepted
