"""A grammar compile that no request needs any more is not run: requests aborted while their
constraint's compile is still queued (a client that sends many schemas and disconnects) give their
place back, so they cannot hold the compile workers that other requests' compiles wait for, and a
tenant's request limit bounds its compiles. A compile another waiting request shares still runs for
it; one already running finishes (it cannot be stopped) and fills the cache."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from agentserve.config import EngineConfig
from agentserve.engine.engine import Engine
from agentserve.grammar.spec import ConstraintSpec
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import tiny_model_cached

PROMPT = [5, 6, 7, 8]


def _schema(i: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"field{i}": {"type": "integer"}}, "required": [f"field{i}"]}


def _params(i: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=3, n=n, json_schema=_schema(i))


def _run(engine: Engine) -> dict[str, Any]:
    finished = {}
    for _ in range(500):
        if not engine.has_unfinished():
            return finished
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    raise AssertionError(f"still running: {list(engine.groups)}")


def test_aborted_requests_withdraw_their_queued_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64,
                                             max_model_len=256, dtype="float32"))
    try:
        engine.add_request("warm", PROMPT, _params(0))  # builds the grammar service
        _run(engine)
        compiler = engine.constraints.compiler  # type: ignore[union-attr]
        backend = compiler.backend
        compile_real = backend.compile
        gate = threading.Event()
        compiled: list[str] = []

        def gated_compile(spec: ConstraintSpec, info: Any) -> Any:
            compiled.append(str(spec.payload))
            assert gate.wait(30)
            return compile_real(spec, info)

        monkeypatch.setattr(backend, "compile", gated_compile)
        # Two compiles take both workers (held at the gate); the rest queue behind them.
        for i in (1, 2):
            engine.add_request(f"running{i}", PROMPT, _params(i))
        for i in (3, 4, 6):
            engine.add_request(f"gone{i}", PROMPT, _params(i))
        engine.add_request("gone-n3", PROMPT, _params(7, n=3))  # one compile for its three sequences
        engine.add_request("kept", PROMPT, _params(5))
        engine.add_request("gone-shared", PROMPT, _params(5))  # shares the compile "kept" waits for
        for rid in ("running1", "gone3", "gone4", "gone6", "gone-n3", "gone-shared"):
            assert engine.abort(rid)
        gate.set()
        finished = _run(engine)
        assert sorted(finished) == ["kept", "running2"]
        assert all(not out.error for out in finished.values()), [out.error for out in finished.values()]
        ran = sorted(next(k for k in range(8) if f"field{k}" in payload) for payload in compiled)
        assert ran == [1, 2, 5], f"compiles run: {ran}"  # 1 was running when its request left
        # A withdrawn constraint compiles anew for the next request that needs it.
        engine.add_request("again3", PROMPT, _params(3))
        finished = _run(engine)
        assert not finished["again3"].error and finished["again3"].outputs[0].finish_reason == "length"
        assert len(compiled) == 4
        assert compiler._inflight == {} and not compiler._queue
    finally:
        engine.close()
