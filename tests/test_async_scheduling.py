"""Async scheduling (step N+1 launched before step N's sampled ids are processed) gives exactly the
outputs of the synchronous path: greedy and seeded tokens, text, finish reasons, logprobs, streamed
deltas; requests finishing at different steps, max_tokens=1, stop strings and ids, EOS, aborts
mid-run, preemption in a tiny pool, fall-backs (penalties, n > 1); grammar batches overlapped; pages all free after."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pytest

from agentserve import SamplingParams
from agentserve.engine.engine import Engine
from agentserve.testing import tiny_model_cached
from agentserve.testing.tiny import ARCHS
from agentserve.worker.launched_step import LaunchedStep


@dataclass
class Seen:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    logprobs: Any = None
    delta_ids: list[int] = field(default_factory=list)
    delta_text: str = ""


def make_engine(arch: str, async_scheduling: bool, **kw: Any) -> Engine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("device", "cpu")
    return Engine.from_kwargs(str(tiny_model_cached(arch)), async_scheduling=async_scheduling, **kw)


def run(engine: Engine, requests: list[tuple[str, Any, SamplingParams]],
        abort_at: Optional[dict[int, list[str]]] = None) -> dict[str, list[Seen]]:
    """Adds the requests, steps to the end (aborting the given ids at the given step numbers), and
    returns every completion as the outputs showed it."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    seen: dict[str, list[Seen]] = {}
    step = 0
    while engine.has_unfinished():
        for rid in (abort_at or {}).get(step, []):
            engine.abort(rid)
        for out in engine.step():
            comps = seen.setdefault(out.request_id, [Seen() for _ in out.outputs])
            for s, c in zip(comps, out.outputs):
                s.delta_ids += c.delta_token_ids
                s.delta_text += c.delta_text
                if out.finished:
                    s.token_ids, s.text, s.finish_reason = list(c.token_ids), c.text, c.finish_reason
                    s.stop_reason = c.stop_reason
                    s.logprobs = [{t: (lp.logprob, lp.rank) for t, lp in pos.items()}
                                  for pos in c.logprobs] if c.logprobs is not None else None
        step += 1
        assert step < 2000
    engine.step()  # an async engine may hold a launched step whose requests all finished
    for s in (s for comps in seen.values() for s in comps if s.finish_reason is not None):
        assert s.delta_ids == s.token_ids and s.delta_text == s.text  # streamed deltas add up
    engine.pool.check_all_free()
    return seen


def assert_same(asyn: dict[str, list[Seen]], sync: dict[str, list[Seen]]) -> None:
    """Tokens, text, finish and stop reasons, deltas: exact. Logprobs: the same token ids and ranks;
    values within 1e-3, since the batches differ between the two paths (a finished request still
    rides one step under async scheduling) and a CPU matmul's rounding depends on the batch."""
    assert asyn.keys() == sync.keys()
    for rid, ref in sync.items():
        for a, s in zip(asyn[rid], ref, strict=True):
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason, a.delta_ids, a.delta_text) == \
                (s.token_ids, s.text, s.finish_reason, s.stop_reason, s.delta_ids, s.delta_text), rid
            assert (a.logprobs is None) == (s.logprobs is None), rid
            for pa, ps in zip(a.logprobs or [], s.logprobs or [], strict=True):
                assert pa.keys() == ps.keys() and all(pa[t][1] == ps[t][1] for t in pa), rid
                assert all(abs(pa[t][0] - ps[t][0]) < 1e-3 for t in pa), rid


def both(arch: str, requests: list[tuple[str, Any, SamplingParams]], abort_at: Optional[dict[int, list[str]]] = None,
         **kw: Any) -> tuple[dict[str, list[Seen]], dict[str, list[Seen]], Engine]:
    sync = run(make_engine(arch, False, **kw), requests, abort_at)
    engine = make_engine(arch, True, **kw)
    return sync, run(engine, requests, abort_at), engine


def mixed_requests(arch: str, seed: int = 0, n: int = 12) -> list[tuple[str, Any, SamplingParams]]:
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        prompt = rng.integers(20, 300, size=int(rng.integers(2, 60))).tolist()
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0.0, max_tokens=1 + i % 3, ignore_eos=True)  # max_tokens=1 included
        elif kind == 1:
            params = SamplingParams(temperature=0.0, max_tokens=int(rng.integers(5, 30)))  # EOS may end it
        elif kind == 2:
            params = SamplingParams(temperature=0.8, seed=100 + i, max_tokens=int(rng.integers(5, 30)), logprobs=2)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=int(rng.integers(10, 40)), ignore_eos=True,
                                    min_tokens=3, logprobs=0)
        reqs.append((f"r{i}", prompt, params))
    return reqs


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_identical_with_and_without_async_scheduling(arch: str) -> None:
    # A small token budget chunks the longer prompts, so prefill chunks and decodes mix in steps.
    sync, asyn, engine = both(arch, mixed_requests(arch), max_num_seqs=6, max_num_batched_tokens=48)
    assert len(sync) == 12
    assert_same(asyn, sync)
    assert engine.async_scheduling


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stop_ids_and_strings_finish_at_different_steps(arch: str) -> None:
    base = mixed_requests(arch, seed=1, n=6)
    reference = run(make_engine(arch, False), base)
    requests = []
    for rid, prompt, params in base:  # stop on a token / text the reference produced mid-way
        out = reference[rid][0]
        if len(out.token_ids) >= 4:
            requests.append((rid + "-id", prompt, params.clone(stop_token_ids=[out.token_ids[len(out.token_ids) // 2]])))
        if len(out.text) >= 6:
            mid = len(out.text) // 2
            requests.append((rid + "-str", prompt, params.clone(stop=[out.text[mid:mid + 2]])))
    assert len(requests) >= 4
    sync, asyn, _ = both(arch, requests)
    assert_same(asyn, sync)
    assert any(c.finish_reason == "stop" for comps in sync.values() for c in comps)


def test_aborts_mid_run_free_pages() -> None:
    requests = [(f"a{i}", list(range(30 + i, 50 + 2 * i)), SamplingParams(temperature=0.0, max_tokens=30,
                                                                          ignore_eos=True)) for i in range(8)]
    abort_at = {0: ["a0"], 2: ["a1", "a2"], 5: ["a3"], 9: ["a7"]}
    aborted = {"a0", "a1", "a2", "a3", "a7"}
    sync, asyn, _ = both("qwen2", requests, abort_at, max_num_seqs=4)
    assert_same({k: v for k, v in asyn.items() if k not in aborted}, {k: v for k, v in sync.items() if k not in aborted})
    for rid in aborted & sync.keys():
        # Async outputs come one step later, so an aborted request has streamed a prefix of the same.
        got, ref = asyn.get(rid, [Seen()])[0].delta_ids, sync[rid][0].delta_ids
        assert ref[:len(got)] == got and len(got) >= len(ref) - 1, rid
    assert all(v[0].finish_reason == "length" for k, v in sync.items() if k not in aborted)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_preemption_in_a_tiny_pool(arch: str) -> None:
    requests = [(f"p{i}", list(range(40 + 7 * i, 52 + 7 * i)), SamplingParams(temperature=0.0, max_tokens=24,
                                                                             ignore_eos=True)) for i in range(6)]
    # decode_reserve_tokens=0: admission reserves no room for outputs, so decoding runs the pool dry.
    kw = {"block_size": 4, "num_blocks": 22, "max_num_seqs": 6, "enable_prefix_caching": False,
          "decode_reserve_tokens": 0}
    sync, asyn, engine = both(arch, requests, **kw)
    assert_same(asyn, sync)
    assert engine.metrics.num_preemptions_total > 0
    assert all(c[0].finish_reason == "length" and len(c[0].token_ids) == 24 for c in asyn.values())


def test_prefix_caching_and_chunks_stay_exact() -> None:
    shared = list(range(100, 150))
    requests = [(f"c{i}", shared + [200 + i] * (i + 1), SamplingParams(temperature=0.0, max_tokens=12 + i,
                                                                      ignore_eos=True)) for i in range(6)]
    sync, asyn, engine = both("llama3", requests, block_size=4, max_num_batched_tokens=32, max_num_seqs=3)
    assert_same(asyn, sync)
    assert engine.pool.hit_tokens > 0


def test_fallbacks_penalties_and_n_greater_than_one() -> None:
    prompt = list(range(60, 90))
    requests = [
        ("pen", prompt, SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True)),
        ("freq", prompt[:10], SamplingParams(temperature=0.0, max_tokens=15, frequency_penalty=0.5,
                                             presence_penalty=0.2, ignore_eos=True)),
        ("fork", prompt[5:], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)),
        ("plain", prompt[3:20], SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)),
    ]
    sync, asyn, _ = both("qwen2", requests)
    assert_same(asyn, sync)
    assert len(asyn["fork"]) == 3


def test_grammar_requests_fall_back_and_stay_valid() -> None:
    import json

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    requests = [
        ("json", "Give JSON:", SamplingParams(temperature=0.0, max_tokens=40, json_schema=schema)),
        ("free", "Hello there", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    ]
    sync, asyn, _ = both("qwen2", requests)
    assert_same(asyn, sync)
    if asyn["json"][0].finish_reason == "stop":
        assert isinstance(json.loads(asyn["json"][0].text)["a"], int)


def _schema_requests(n: int) -> list[tuple[str, Any, SamplingParams]]:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "bc", "d"]}}},
              "required": ["name", "n"]}
    reqs: list[tuple[str, Any, SamplingParams]] = []
    for i in range(n):
        # Seeded sampling (so the outputs differ per request), greedy, short max_tokens (cut off by
        # length), and a plain request in the same batch.
        params = SamplingParams(temperature=0.9 if i % 2 else 0.0, seed=7 + i, max_tokens=8 + 9 * (i % 4),
                                json_schema=schema, logprobs=1 if i % 3 == 0 else None)
        reqs.append((f"json{i}", f"Give JSON number {i}:", params))
    reqs.append(("free", "Hello there", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)))
    return reqs


@pytest.mark.parametrize("arch", ["qwen2", "llama3"])
def test_grammar_batches_overlap_and_stay_exact(arch: str) -> None:
    """Grammar rows no longer force the synchronous order: step N+1's forward is launched before
    step N's tokens are read, and step N is processed (its tokens accepted by the matchers) inside
    N+1's launch, before N+1's masks are filled. Outputs stay those of the synchronous path, valid
    against the schema when they stop, and every page comes back."""
    import jsonschema

    requests = _schema_requests(6)
    sync = run(make_engine(arch, False), requests)
    engine = make_engine(arch, True)
    order: list[str] = []
    launch, result = engine.runner.launch, LaunchedStep.result

    def launching(*a: Any, **k: Any) -> Any:
        order.append("launch")
        out = launch(*a, **k)
        order.append("launched")
        return out

    def reading(self: LaunchedStep) -> Any:
        order.append("read")
        return result(self)

    engine.runner.launch = launching  # type: ignore[method-assign]
    LaunchedStep.result = reading  # type: ignore[method-assign]
    try:
        asyn = run(engine, requests)
    finally:
        LaunchedStep.result = result  # type: ignore[method-assign]
    assert_same(asyn, sync)
    schema = requests[0][2].json_schema
    stopped = [s for rid, comps in asyn.items() if rid != "free" for s in comps if s.finish_reason == "stop"]
    for s in stopped:
        jsonschema.validate(json.loads(s.text), schema)
    # Reads inside a launch (between its start and its end): the overlap with grammar rows.
    inside = sum(1 for i, ev in enumerate(order[:-1]) if ev == "launch" and order[i + 1] == "read")
    assert inside >= 5, order[:20]


def test_async_scheduling_launches_before_reading_the_previous_step() -> None:
    """The overlap itself: step N+1 is launched while step N's ids have not been read yet."""
    engine = make_engine("llama", True)
    order: list[str] = []
    launch, result = engine.runner.launch, LaunchedStep.result
    engine.runner.launch = lambda *a, **k: (order.append("launch"), launch(*a, **k))[1]  # type: ignore[method-assign]

    def reading(self: LaunchedStep) -> Any:
        order.append("read")
        return result(self)

    LaunchedStep.result = reading  # type: ignore[method-assign]
    try:
        run(engine, [("x", list(range(10, 30)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))])
    finally:
        LaunchedStep.result = result  # type: ignore[method-assign]
    # prefill launched; decode launched before the prefill's token is read; ...; max_tokens known on
    # the host, so no step is launched past the last token.
    assert order[:4] == ["launch", "launch", "read", "launch"]
    assert order.count("launch") == 6 and order.count("read") == 6


def test_sync_is_the_default_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from agentserve.config import EngineConfig
    from agentserve.engine.loading import resolve_async_scheduling

    monkeypatch.delenv("AGENTSERVE_ASYNC_SCHEDULING", raising=False)
    cfg = EngineConfig.from_kwargs("x")
    assert resolve_async_scheduling(cfg, torch.device("cuda")) and not resolve_async_scheduling(cfg, torch.device("cpu"))
    monkeypatch.setenv("AGENTSERVE_ASYNC_SCHEDULING", "1")
    assert resolve_async_scheduling(cfg, torch.device("cpu"))
    cfg = EngineConfig.from_kwargs("x", async_scheduling=False)
    assert not resolve_async_scheduling(cfg, torch.device("cuda"))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_decoder_matches_tokenizer_decode(arch: str) -> None:
    from transformers import AutoTokenizer

    from agentserve.engine.detokenizer import decoder_for

    tok = AutoTokenizer.from_pretrained(str(tiny_model_cached(arch)))
    fn = decoder_for(tok)
    rng = np.random.default_rng(0)
    special = list(tok.all_special_ids)
    for _ in range(200):
        ids = rng.integers(0, len(tok), size=int(rng.integers(0, 12))).tolist() + special[: int(rng.integers(0, 2))]
        rng.shuffle(ids)
        for skip in (True, False):
            assert fn(ids, skip) == tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_async_scheduling_matches_sync(arch: str, dtype: str) -> None:
    """On the device (pinned buffers, events, the on-device input gather, CUDA graphs). Same
    max_tokens for every request: both paths then run the same batches, so even bf16 must agree
    exactly. Then a mix that finishes at different steps (fp32; batches differ by the wasted rows)."""
    # A fixed page count skips the memory profiling (engines of earlier tests may still hold memory).
    kw = {"device": "cuda", "dtype": dtype, "max_num_seqs": 8, "max_model_len": 512, "num_blocks": 256}
    same = [(f"g{i}", list(range(20 + 9 * i, 40 + 13 * i)), SamplingParams(temperature=0.0, max_tokens=24,
                                                                          ignore_eos=True, logprobs=3))
            for i in range(6)]
    sync = run(make_engine(arch, False, **kw), same)
    engine = make_engine(arch, True, **kw)
    assert engine.runner.graphs is not None
    asyn = run(engine, same)
    assert_same(asyn, sync)
    if dtype == "float32":
        sync, asyn, _ = both(arch, mixed_requests(arch), **kw)
        assert_same(asyn, sync)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen2", "llama3"])
def test_cuda_grammar_batches_overlap_and_match_sync(arch: str) -> None:
    """Grammar masks under async scheduling on the device: step N is processed inside step N+1's
    launch (pinned mask buffer reused step after step, the bitmask kernel, CUDA graphs). fp32, so the
    batches that differ by a finished request's wasted row give the same tokens."""
    kw = {"device": "cuda", "dtype": "float32", "max_num_seqs": 8, "max_model_len": 512, "num_blocks": 256}
    sync, asyn, engine = both(arch, _schema_requests(7), **kw)
    assert engine.runner.graphs is not None
    assert_same(asyn, sync)
