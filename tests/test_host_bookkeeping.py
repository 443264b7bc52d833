"""Issue #16's vectorised per-step bookkeeping gives exactly what the row-by-row code gave.

- build_step_inputs (numpy columns for decode rows) against a plain row-by-row reference, on a step
  that mixes decodes, decodes gathered from the step in flight, prefill chunks, middle chunks that
  sample nothing and verification rows.
- update_from_output's inline path for one-token rows (OutputProcessor._append_plain, which runs
  `_check_stop` only when it can act): on a workload of stop ids, EOS with and without ignore_eos,
  min_tokens, max_tokens and n > 1, the outputs and finish reasons equal the ones computed
  independently from one greedy reference run, and the inline path is taken for every row; with a
  tokenizer (stop strings, logprobs) and min_tokens bans that change the tokens, the outputs and
  counters equal those of the row-by-row path.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest
import torch

from agentserve import SamplingParams
from agentserve.engine.engine import Engine
from agentserve.engine.output import OutputProcessor
from agentserve.request import Request
from agentserve.testing import tiny_model_cached
from agentserve.worker.step_inputs import ScheduledChunk, build_step_inputs

# --- step inputs ----------------------------------------------------------------------------------


def _request(rid: str, tokens: list[int], computed: int, table: list[int]) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=4))
    req.num_computed_tokens = computed
    req.block_table = list(table)
    return req


def _reference_inputs(chunks: list[ScheduledChunk], bs: int, prev_rows: dict[str, int],
                      prev_sampled: list[int]) -> dict[str, list[int]]:
    """The step's flat inputs, one token at a time (the step contract, DESIGN.md)."""
    ref: dict[str, list[int]] = {"ids": [], "positions": [], "slots": [], "seq_lens": [], "logits": []}
    for chunk in chunks:
        req = chunk.request
        start = req.num_computed_tokens
        known = req.all_token_ids + chunk.spec_token_ids
        for pos in range(start, start + chunk.num_tokens):
            if pos < len(req.all_token_ids) or chunk.spec_token_ids:
                ref["ids"].append(known[pos])
            else:  # the token in flight: the previous step's sample for this request
                ref["ids"].append(prev_sampled[prev_rows[req.request_id]])
            ref["positions"].append(pos)
            ref["slots"].append(req.block_table[pos // bs] * bs + pos % bs)
        ref["seq_lens"].append(start + chunk.num_tokens)
        end = len(ref["ids"])
        ref["logits"] += list(range(end - chunk.num_sampled, end))
    return ref


def test_step_inputs_match_a_row_by_row_reference() -> None:
    bs = 4
    rng = np.random.default_rng(0)
    toks = lambda n: rng.integers(0, 500, size=n).tolist()  # noqa: E731
    decode = _request("decode", toks(9), 8, [7, 3, 11])                      # input known on the host
    gathered = _request("gathered", toks(6), 6, [5, 2])                       # input in flight
    prefill = _request("prefill", toks(11), 0, [1, 4, 9])                    # whole prompt, samples
    middle = _request("middle", toks(13), 4, [6, 8, 10, 12])                 # a middle chunk: no sample
    verify = _request("verify", toks(7), 6, [13, 14, 15])                     # 1 + 2 speculative tokens
    gathered2 = _request("gathered2", toks(4), 4, [16, 17])
    chunks = [ScheduledChunk(decode, 1, 1), ScheduledChunk(gathered, 1, 1), ScheduledChunk(prefill, 11, 1),
              ScheduledChunk(middle, 5, 0), ScheduledChunk(verify, 3, 3, [42, 43]), ScheduledChunk(gathered2, 1, 1)]
    prev_sampled = [901, 902, 903, 904]
    prev_rows = {"gathered": 2, "gathered2": 0}
    prev = SimpleNamespace(rows=prev_rows, sampled=torch.tensor(prev_sampled))
    out = build_step_inputs(chunks, bs, torch.device("cpu"), None, prev)  # type: ignore[arg-type]
    ref = _reference_inputs(chunks, bs, prev_rows, prev_sampled)
    assert out.input_ids.tolist() == ref["ids"]
    assert out.positions.tolist() == ref["positions"]
    assert out.meta.slot_mapping.tolist() == ref["slots"]
    assert out.meta.seq_lens.tolist() == ref["seq_lens"]
    assert out.logits_indices.tolist() == ref["logits"]
    assert out.meta.query_start_loc.tolist() == np.concatenate([[0], np.cumsum([c.num_tokens for c in chunks])]).tolist()
    tables = out.meta.block_tables.tolist()
    for row, chunk in zip(tables, chunks):
        n = len(chunk.request.block_table)
        assert row[:n] == chunk.request.block_table and not any(row[n:])
    assert out.meta.max_query_len == 11 and out.meta.max_seq_len == 11


def test_step_inputs_of_decodes_only() -> None:
    reqs = [_request(f"r{i}", list(range(10 + i)), 9 + i, [i, 50 + i, 80 + i, 120 + i]) for i in range(5)]
    chunks = [ScheduledChunk(r, 1, 1) for r in reqs]
    out = build_step_inputs(chunks, 4, torch.device("cpu"), None)
    ref = _reference_inputs(chunks, 4, {}, [])
    assert (out.input_ids.tolist(), out.positions.tolist(), out.meta.slot_mapping.tolist(),
            out.logits_indices.tolist()) == (ref["ids"], ref["positions"], ref["slots"], ref["logits"])


# --- update_from_output ---------------------------------------------------------------------------


def _engine(async_scheduling: bool, tokenizer: bool) -> Engine:
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), device="cpu", max_model_len=256,
                                async_scheduling=async_scheduling)
    if not tokenizer:
        engine.tokenizer = None  # no detokenizer: only token ids and lengths decide stops
    return engine


def _run(engine: Engine, requests: list[tuple[str, Any, SamplingParams]]) -> dict[str, list[tuple]]:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    done: dict[str, list[tuple]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(list(c.token_ids), c.finish_reason, c.stop_reason, c.text,
                                         [{t: round(lp.logprob, 4) for t, lp in p.items()} for p in c.logprobs or []])
                                        for c in out.outputs]
        steps += 1
        assert steps < 1000
    engine.step()
    engine.pool.check_all_free()
    engine.close()
    return done


def _expected(ref: list[int], stops: set[int], eos: set[int], max_tokens: int) -> tuple[list[int], str, Optional[int]]:
    """Where a greedy sequence ends: at its first stop id (stop_reason: the id) or EOS (None), else
    at max_tokens."""
    for j, t in enumerate(ref[:max_tokens]):
        if t in stops:
            return ref[:j + 1], "stop", t
        if t in eos:
            return ref[:j + 1], "stop", None
    return ref[:max_tokens], "length", None


class _Counts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        self.checks: list[int] = []
        append_row, check_stop = OutputProcessor._append_row, OutputProcessor._check_stop

        def counted_row(proc: OutputProcessor, *args: Any) -> int:
            self.rows += 1
            return append_row(proc, *args)

        def counted_check(proc: OutputProcessor, req: Request, token: int) -> None:
            self.checks.append(token)
            check_stop(proc, req, token)

        monkeypatch.setattr(OutputProcessor, "_append_row", counted_row)
        monkeypatch.setattr(OutputProcessor, "_check_stop", counted_check)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_token_rows_match_independent_expectations(async_scheduling: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    prompts = [rng.integers(20, 300, size=int(rng.integers(3, 30))).tolist() for _ in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = _run(_engine(async_scheduling, tokenizer=False), [(f"p{i}", p, greedy) for i, p in enumerate(prompts)])
    refs = [reference[f"p{i}"][0][0] for i in range(len(prompts))]
    engine = _engine(async_scheduling, tokenizer=False)
    eos = refs[0][6]
    engine.eos_token_ids = frozenset({eos})  # a token the greedy runs do produce
    engine.output.tokenizer_eos_id = eos  # as the tokenizer's own EOS: stop_reason None (others stop by id)
    requests, expect = [], {}
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        stop = ref[4 + i % 3]
        first_stop = min(j for j, t in enumerate(ref) if t == stop or t == eos)
        cases = {
            "len": SamplingParams(temperature=0.0, max_tokens=3 + i),                     # EOS may end it first
            "eos": SamplingParams(temperature=0.0, max_tokens=30),                         # ends at EOS for p0
            "ignore": SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
            "stop": SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop]),
            "stop-ignore": SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop], ignore_eos=True),
            # min_tokens up to the first stop: the bans cover no greedy token, so nothing changes.
            "min": SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop], min_tokens=first_stop),
            "one": SamplingParams(temperature=0.0, max_tokens=1),
            "n2": SamplingParams(temperature=0.0, max_tokens=20, n=2, stop_token_ids=[stop]),
        }
        for name, params in cases.items():
            rid = f"{name}-{i}"
            requests.append((rid, prompt, params))
            eos_ids = set() if params.ignore_eos else {eos}
            expect[rid] = [_expected(ref, set(params.stop_token_ids), eos_ids, params.max_tokens)] * params.n
    counts = _Counts(monkeypatch)
    done = _run(engine, requests)
    assert done.keys() == expect.keys()
    for rid, comps in done.items():
        assert [(c[0], c[1], c[2]) for c in comps] == expect[rid], rid
    ends = {(c[1], c[2] is None) for comps in done.values() for c in comps}
    assert ends == {("stop", True), ("stop", False), ("length", True)}  # EOS, a stop id, max_tokens
    # Every row was appended inline, and the stop checks ran only on the tokens they act on.
    assert counts.rows == 0
    flagged = 0
    for rid, prompt, params in requests:
        for tokens, *_ in done[rid]:
            flagged += sum(1 for j, t in enumerate(tokens)
                           if t == eos or t in params.stop_token_ids or j + 1 >= params.max_tokens)
    assert len(counts.checks) == flagged
    assert flagged < sum(len(c[0]) for comps in done.values() for c in comps) // 2


def _row_by_row(proc: OutputProcessor, req: Request, token: int, result: Any, row: int, now: float,
                max_model_len: int) -> None:
    """What _append_row did for a one-token row before the inline path."""
    req.spec_token_ids = []
    req.spec_draft_probs = None
    proc.engine.metrics.record_spec_row(0, 0)
    proc._record_token(req, token, result, row, 0, now)
    proc._check_stop(req, token)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_token_rows_match_the_row_by_row_path(async_scheduling: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    requests = []
    for i in range(10):
        prompt = rng.integers(20, 300, size=int(rng.integers(3, 40))).tolist()
        params = [SamplingParams(temperature=0.0, max_tokens=25, min_tokens=12),  # bans change the tokens
                  SamplingParams(temperature=0.7, seed=i, max_tokens=20, logprobs=2),
                  SamplingParams(temperature=0.0, max_tokens=30, stop=["e", "a "]),
                  SamplingParams(temperature=0.0, max_tokens=15, n=3, ignore_eos=True, logprobs=0),
                  SamplingParams(temperature=0.0, max_tokens=1 + i)][i % 5]
        requests.append((f"r{i}", prompt, params))

    def outputs() -> tuple[dict[str, list[tuple]], tuple[int, int]]:
        engine = _engine(async_scheduling, tokenizer=True)
        done = _run(engine, requests)
        return done, (engine.metrics.generation_tokens_total, engine.metrics.requests_finished_total)

    inline = outputs()
    monkeypatch.setattr(OutputProcessor, "_append_plain", _row_by_row)
    assert outputs() == inline
    assert any(c[1] == "stop" for comps in inline[0].values() for c in comps)
