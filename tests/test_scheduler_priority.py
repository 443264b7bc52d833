"""policy="priority" as vLLM V1 runs it: the running requests keep their admission order for the token budget (a
higher-priority prompt's chunked prefill does not stall the decodes already running), and priority picks the
preemption victim, the max of (priority, arrival), even one this step already scheduled: its tokens go back to the
budget and its copies are dropped; every output stays what it is without any pressure."""

from __future__ import annotations

from typing import Any

from agentserve import SamplingParams
from agentserve.engine.engine import Engine
from agentserve.testing import tiny_model_cached

MODEL = str(tiny_model_cached("llama"))


def _engine(**kw: Any) -> tuple[Engine, list[Any]]:
    engine = Engine.from_kwargs(MODEL, device="cpu", policy="priority", block_size=16, max_model_len=1024, **kw)
    log: list[Any] = []
    schedule = engine.scheduler.schedule

    def recorded() -> Any:
        out = schedule()
        log.append((dict(out.num_scheduled_tokens), [r.request_id for r in out.preempted], list(out.device_ops)))
        return out

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    return engine, log


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 101 + 7 * i) % 500 + 3 for i in range(n)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _finish(engine: Engine) -> dict[str, list[int]]:
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = list(out.outputs[0].token_ids)
    return outs


def test_a_high_priority_prefill_leaves_running_decodes_a_token_each_step() -> None:
    engine, log = _engine(max_num_batched_tokens=32, max_num_seqs=8, num_blocks=200)
    for name, seed in (("low0", 1), ("low1", 2)):
        engine.add_request(name, _prompt(seed, 8), _greedy(40), priority=5)
    for _ in range(3):
        engine.step()
    engine.add_request("urgent", _prompt(3, 300), _greedy(2), priority=0)
    start = len(log)
    for _ in range(6):
        engine.step()
    for tokens, _, _ in log[start:]:
        assert tokens["low0"] == tokens["low1"] == 1 and tokens["urgent"] == 30, tokens
    _finish(engine)
    engine.close()


def test_the_priority_victim_is_unscheduled_when_this_step_had_scheduled_it() -> None:
    """'low' is admitted a step before 'high', so it runs first and takes the spare page a token ahead of high; when
    high then needs a page the pool lacks, low, already given its decode token in this step, is the victim."""
    requests = {"low": (_prompt(1, 31), 5), "high": (_prompt(2, 31), 0)}
    want = {}
    for name, (ids, _) in requests.items():
        alone, _ = _engine(num_blocks=64)
        alone.add_request(name, ids, _greedy(12))
        want[name] = _finish(alone)[name]
        alone.close()
    engine, log = _engine(num_blocks=5, max_num_seqs=4, decode_reserve_tokens=1)  # 2 pages each, 1 spare
    taken_back: list[int] = []
    unschedule = engine.scheduler._unschedule

    def recorded(*args: Any) -> int:
        taken_back.append(unschedule(*args))
        return taken_back[-1]

    engine.scheduler._unschedule = recorded  # type: ignore[method-assign]
    engine.add_request("low", requests["low"][0], _greedy(12), priority=5)
    engine.step()
    engine.add_request("high", requests["high"][0], _greedy(12), priority=0)
    outs = _finish(engine)
    unscheduled = [(tokens, preempted) for tokens, preempted, _ in log if "low" in preempted]
    assert unscheduled and all("low" not in tokens for tokens, _ in unscheduled), log
    assert 1 in taken_back  # low's decode token of that step went back to the budget
    assert outs == want
    engine.pool.check_all_free()
    engine.close()
