"""An idle engine keeps no finished request alive. The model runner reuses the last step's sampling
metadata while the same requests sample in the same order; that cache outlives the step, so it
must not hold the requests themselves (their token lists, detokenizers, grammar matchers and
logprobs would stay in memory, up to a whole batch, until the next request comes)."""

from __future__ import annotations

import gc
import weakref

from agentserve import SamplingParams
from agentserve.engine.engine import Engine
from agentserve.request import Request
from agentserve.testing import tiny_model_cached


def test_finished_requests_are_freed_while_the_engine_idles() -> None:
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), device="cpu", num_blocks=64, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    refs = []
    for i in range(3):
        engine.add_request(f"r{i}", [1 + i, 5, 9, 13, 17], params)
        refs.append(weakref.ref(engine.requests[f"r{i}"]))
    finished = 0
    while engine.has_unfinished():
        finished += sum(out.finished for out in engine.step())
    assert finished == 3
    gc.collect()
    alive = [r().request_id for r in refs if r() is not None]
    assert alive == [], f"finished requests still referenced: {alive}"
    engine.close()


def test_the_sampling_metadata_is_still_reused_for_the_same_rows() -> None:
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), device="cpu", num_blocks=64, max_model_len=256)
    rows = [Request(f"q{i}", [3, 4, 5], SamplingParams(temperature=0.5, max_tokens=2)) for i in range(2)]
    runner = engine.runner
    first = runner._sampling_metadata(rows)
    assert runner._sampling_metadata(list(rows)) is first  # the same requests in the same order: reused
    assert runner._sampling_metadata(rows[::-1]) is not first  # another order: rebuilt
    engine.close()
