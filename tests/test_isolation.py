"""One request can never hurt another (issue 10, "isolation in the step").

Each bad request runs beside six innocent ones (two HTTP streams, two gRPC Generate calls, two
session Turns) on one server. Values out of range are refused at the edge (HTTP 400 naming the field
in `param`, gRPC INVALID_ARGUMENT naming it); failures that only show mid-output (a matcher that
raises, a tokenizer that fails) end the bad request alone with an error on its own stream. Every
innocent request finishes with exactly the output it has when run alone, without any error, and
never sees the bad request's data. Injected failures are monkeypatched here, not hooked in the package.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import grpc
import httpx
import llguidance
import pytest

from agentserve.adapters.client import AgentClient
from agentserve.adapters.client.client import to_sampling
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.detokenizer import IncrementalDetokenizer
from agentserve.engine.engine import Engine
from agentserve.errors import InvalidRequestError
from agentserve.grammar.llguidance_backend import LLGuidanceGrammar, LLGuidanceMatcher
from agentserve.grammar.state import GrammarState
from agentserve.sampling_params import SamplingParams, SamplingParamsError
from conftest_grpc import SYSTEM, make_config, make_engine, run, serving

MODEL = "tiny-iso"
MAX_TOKENS = 8
SECRET = "zq-secret-7731"  # in every bad request (its stop string or grammar): no innocent may see it
BREAK_MATCHER = SECRET + "-matcher"  # a grammar with this in it gets a matcher that raises mid-output
BREAK_DETOKENIZER = SECRET + "-detokenizer"  # a stop string that makes the detokenizer raise
BREAK_MASK = SECRET + "-mask"  # a grammar with this in it gets a matcher whose mask fill raises
# A grammar with one of these in it gets a real llguidance matcher with a lexer-state limit that its first
# mask (met by the compile's check), or a mask a few tokens in (met in a step), exceeds.
LIMIT_FIRST, LIMIT_MID = SECRET + "-limit-first", SECRET + "-limit-mid"
LEXER_STATES = {LIMIT_FIRST: 2, LIMIT_MID: 33}
INNOCENT_IDS = [[11 + 7 * i, 23 + i, 40 + 3 * i, 5] for i in range(2)]
INNOCENT_GEN_IDS = [[101 + 5 * i, 77, 9 + i] for i in range(2)]
INNOCENT_TURNS = ["Say hello to the first tester.", "Name a colour, please."]


@dataclass
class BadCase:
    """A bad request: its fields per channel (None: the channel cannot carry it), and what it gets."""
    http: Optional[dict[str, Any]]
    grpc: Optional[dict[str, Any]]
    field: Optional[str]  # refused at the edge naming this field; None: fails mid-output (or at compile)
    response_format: Optional[dict[str, Any]] = None  # gRPC's form of an output constraint
    says: str = ""  # what the bad request's error message says (it may quote the request's own data)
    # Past the edge: (the HTTP outcome, the gRPC status). The request's own fault (a constraint that does
    # not compile) is 400 / INVALID_ARGUMENT; the server's is a 500 before the stream starts, an error
    # event on a started stream, and INTERNAL.
    fails_as: tuple[str, str] = ("", "")
    # Also right over HTTP: a failure met at the first tokens reaches the handler before the stream's
    # headers when the step thread outruns it (the first token and the error come in one output).
    http_also: tuple[str, ...] = ()


SCHEMA_PATTERN = {"type": "object", "properties": {"v": {"type": "string", "pattern": "^d{1000000}$"}},
                  "required": ["v"], "description": SECRET}
CASES = {
    "seed_over_uint64": BadCase({"seed": 2**64, "stop": [SECRET]}, None, "seed"),
    "seed_under_int64": BadCase({"seed": -(2**63) - 1, "stop": [SECRET]}, None, "seed"),
    "top_k_over_int64": BadCase({"top_k": 2**63, "stop": [SECRET]}, None, "top_k"),
    "top_k_over_vocab": BadCase({"top_k": 2**31 - 1, "stop": [SECRET]}, {"top_k": 2**31 - 1, "stop": [SECRET]},
                                "top_k"),
    "temperature_nan": BadCase({"temperature": math.nan, "stop": [SECRET]},
                               {"temperature": math.nan, "stop": [SECRET]}, "temperature"),
    "penalty_inf": BadCase({"frequency_penalty": math.inf, "stop": [SECRET]},
                           {"frequency_penalty": math.inf, "stop": [SECRET]}, "frequency_penalty"),
    "stop_lone_surrogate": BadCase({"stop": [SECRET + "\ud800"]}, None, "stop"),
    "regex_huge_repeat": BadCase({"guided_regex": f"({SECRET})?a{{1000000}}"}, {}, None,
                                 {"type": "regex", "regex": f"({SECRET})?a{{1000000}}"}, says="constraint",
                                 # llguidance builds its lexer lazily: the limit is met mid-output, in a
                                 # token's consume or in the next mask's fill (the request's fault either way)
                                 fails_as=("stream-error", "INVALID_ARGUMENT"), http_also=("400",)),
    "schema_huge_pattern": BadCase(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA_PATTERN}}},
        {}, None, {"type": "json_schema", "json_schema": json.dumps(SCHEMA_PATTERN)}, says="constraint",
        fails_as=("400", "INVALID_ARGUMENT")),
    "matcher_raises_mid_output": BadCase({"guided_regex": f"({BREAK_MATCHER}|[a-z ]{{1,40}})"}, {}, None,
                                         {"type": "regex", "regex": f"({BREAK_MATCHER}|[a-z ]{{1,40}})"}, says="matcher broke",
                                         fails_as=("stream-error", "INTERNAL")),
    # The server's fault before the first token: no 400 (it used to be, as anything failing before output).
    "mask_fill_fails_first": BadCase({"guided_regex": f"({BREAK_MASK}|[a-z ]{{1,40}})"}, {}, None,
                                     {"type": "regex", "regex": f"({BREAK_MASK}|[a-z ]{{1,40}})"}, says="mask fill broke",
                                     fails_as=("500", "INTERNAL")),
    # A backend limit met computing the first mask: llguidance leaves the row empty (nothing allowed) and
    # its matcher in an error state. The constraint's fault, so the request's: not "sampled token 0 is not
    # allowed" as a server fault (which that empty row used to give).
    "mask_limit_first": BadCase({"guided_regex": f"({LIMIT_FIRST}|[a-z ]{{1,40}})"}, {}, None,
                                {"type": "regex", "regex": f"({LIMIT_FIRST}|[a-z ]{{1,40}})"}, says="too many states",
                                fails_as=("400", "INVALID_ARGUMENT")),
    "mask_limit_mid_output": BadCase({"guided_regex": f"({LIMIT_MID}|[a-z ]{{1,40}})"}, {}, None,
                                     {"type": "regex", "regex": f"({LIMIT_MID}|[a-z ]{{1,40}})"},
                                     says="too many states", fails_as=("stream-error", "INVALID_ARGUMENT"),
                                     http_also=("400",)),
    "detokenizer_fails": BadCase({"stop": [BREAK_DETOKENIZER]}, {"stop": [BREAK_DETOKENIZER]}, None, says="tokenizer failed",
                                 fails_as=("stream-error", "INTERNAL")),
}


@pytest.fixture(scope="module")
def aeng() -> Iterator[AsyncEngine]:
    engine = make_engine(served_model_name=MODEL, num_blocks=256)
    yield engine
    engine.shutdown()


@pytest.fixture
def injected_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matcher that raises after two accepted tokens for a grammar that names BREAK_MATCHER, one
    whose mask fill raises for a grammar naming BREAK_MASK, real llguidance matchers with a lexer limit
    for grammars naming LIMIT_FIRST / LIMIT_MID, and a detokenizer that fails for a request
    whose stop strings hold BREAK_DETOKENIZER."""
    accepted: dict[int, int] = {}
    accept_token = GrammarState.accept_token

    def failing_accept(self: GrammarState, token_id: int) -> bool:
        if self.grammar is not None and BREAK_MATCHER in repr(self.grammar.spec):
            accepted[id(self)] = accepted.get(id(self), 0) + 1
            if accepted[id(self)] > 2:
                raise RuntimeError(f"matcher broke on {SECRET}")
        return accept_token(self, token_id)

    append = IncrementalDetokenizer.append

    def failing_append(self: IncrementalDetokenizer, token_id: int) -> Optional[str]:
        if BREAK_DETOKENIZER in self.stop and len(self.token_ids) > 5:
            raise RuntimeError(f"tokenizer failed decoding for {SECRET}")
        return append(self, token_id)

    fill = GrammarState.fill

    def failing_fill(self: GrammarState, bitmask: Any, row: int) -> None:
        if self.grammar is not None and BREAK_MASK in repr(self.grammar.spec):
            raise RuntimeError(f"mask fill broke on {SECRET}")
        fill(self, bitmask, row)

    new_matcher = LLGuidanceGrammar.new_matcher

    def limited_matcher(self: LLGuidanceGrammar) -> LLGuidanceMatcher:
        states = next((n for marker, n in LEXER_STATES.items() if marker in repr(self.spec)), None)
        if states is None:
            return new_matcher(self)
        lltok, grammar, log_level = self._fresh_args
        return LLGuidanceMatcher(self.tokenizer_info, llguidance.LLMatcher(
            lltok, grammar, log_level=log_level, limits=llguidance.LLParserLimits(max_lexer_states=states)))

    monkeypatch.setattr(LLGuidanceGrammar, "new_matcher", limited_matcher)
    monkeypatch.setattr(GrammarState, "accept_token", failing_accept)
    monkeypatch.setattr(GrammarState, "fill", failing_fill)
    monkeypatch.setattr(IncrementalDetokenizer, "append", failing_append)


# --- the innocents --------------------------------------------------------------------------------------
async def _http_stream(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str, list[dict[str, Any]]]:
    """(status, streamed text, error bodies) of a streaming completion."""
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True, **body}
    async with http.stream("POST", "/v1/completions", content=json.dumps(body),
                           headers={"content-type": "application/json"}) as r:
        if r.status_code != 200:
            return r.status_code, "", [json.loads(await r.aread())]
        text, errors = [], []
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                errors.append(event)
            else:
                text.extend(c["text"] for c in event["choices"])
        return 200, "".join(text), errors


async def _generate(client: AgentClient, ids: list[int], **kw: Any) -> list[int]:
    done = await client.generate_done(prompt_token_ids=ids, max_tokens=MAX_TOKENS, temperature=0.0,
                                      return_token_ids=True, **kw)
    return list(done.token_ids)


async def _turn(client: AgentClient, text: str, **kw: Any) -> str:
    session = await client.create_session([SYSTEM])
    try:
        outcome = await session.run_turn([{"role": "user", "content": text}], max_tokens=MAX_TOKENS,
                                         temperature=0.0, **kw)
        return outcome.text
    finally:
        await session.close()


async def _innocents(http: httpx.AsyncClient, client: AgentClient) -> list[Any]:
    return list(await asyncio.gather(
        *[_http_stream(http, {"prompt": ids}) for ids in INNOCENT_IDS],
        *[_generate(client, ids) for ids in INNOCENT_GEN_IDS],
        *[_turn(client, text) for text in INNOCENT_TURNS]))


# --- the bad request, per channel ------------------------------------------------------------------------
@dataclass
class BadOutcome:
    code: str  # "400" / "stream-error" (HTTP) or a gRPC status name
    message: str
    param: Optional[str] = None


async def _bad_http(http: httpx.AsyncClient, fields: dict[str, Any]) -> BadOutcome:
    status, _, errors = await _http_stream(http, {"prompt": [3, 4, 5], "max_tokens": 12, **fields})
    assert errors, f"the bad request finished without an error (status {status})"
    err = errors[0]["error"]
    return BadOutcome(str(status) if status != 200 else "stream-error", err["message"], err["param"])


async def _bad_grpc(coro: Any) -> BadOutcome:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return BadOutcome(e.code().name, e.details() or "")
    raise AssertionError("the bad gRPC request finished without an error")


def _bad_grpc_kwargs(case: BadCase) -> dict[str, Any]:
    assert case.grpc is not None
    kw: dict[str, Any] = dict(case.grpc, max_tokens=12)
    if case.response_format is not None:
        kw["response_format"] = case.response_format
    return kw


async def _bad(channel: str, case: BadCase, http: httpx.AsyncClient, client: AgentClient) -> BadOutcome:
    if channel == "http":
        assert case.http is not None
        return await _bad_http(http, case.http)
    kw = _bad_grpc_kwargs(case)
    if channel == "generate":
        return await _bad_grpc(client.generate_done(prompt_token_ids=[3, 4, 5], **kw))

    async def turn() -> None:
        session = await client.create_session([SYSTEM])
        try:
            await session.run_turn([{"role": "user", "content": "Tell me something."}], **kw)
        finally:
            await session.close()

    return await _bad_grpc(turn())


@pytest.mark.parametrize("channel", ["http", "generate", "turn"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_bad_request_fails_alone(aeng: AsyncEngine, injected_failures: None, case_name: str, channel: str) -> None:
    case = CASES[case_name]
    if channel != "http" and case.grpc is None:
        # The protobuf types cannot carry these values at all (int64 seed, int32 top_k, UTF-8 strings).
        with pytest.raises((ValueError, UnicodeError)):
            to_sampling(**case.http).SerializeToString()  # type: ignore[arg-type]
        return

    async def scenario() -> tuple[list[Any], list[Any], BadOutcome]:
        async with serving(aeng, http_port=0) as (handle, client):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=120) as http:
                alone = await _innocents(http, client)
                *beside, bad = await asyncio.gather(_innocents(http, client), _bad(channel, case, http, client))
                return alone, beside[0], bad

    alone, beside, bad = run(scenario(), timeout=300)
    # Every innocent finished as it does alone (greedy), with no error, and nothing of the bad request.
    assert beside == alone
    for status, text, errors in beside[:2]:
        assert status == 200 and errors == [] and text
    assert SECRET not in repr(beside)
    if case.field is not None:
        if channel == "http":
            # the edge may name the element (stop[0]) rather than the field
            assert bad.code == "400" and bad.param is not None and (
                bad.param == case.field or bad.param.startswith(case.field + "[")), bad
        else:
            assert bad.code == "INVALID_ARGUMENT" and case.field in bad.message, bad
    else:
        # A failed compile is the client's error; a failure inside the engine is the server's: either way
        # the bad stream alone ends with an error that says what failed.
        http_code, grpc_code = case.fails_as
        expected = (http_code, *case.http_also) if channel == "http" else (grpc_code,)
        assert bad.code in expected, bad
        assert case.says in bad.message, bad


# --- the engine alone (offline API) --------------------------------------------------------------------------
def _run_to_end(engine: Engine, bad: Optional[SamplingParams],
                after_validation: Optional[dict[str, Any]] = None) -> dict[str, tuple[list[int], Any]]:
    """Six greedy innocents, then (once they run) the bad request; `after_validation` sets fields on
    the bad request's parameters once the engine has accepted them: values that once passed
    validation and failed inside the step (what a gap in validation would let through)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    for i in range(6):
        engine.add_request(f"innocent-{i}", [9 + i, 31, 8, 2 + i], greedy)
    engine.step()
    engine.step()  # the innocents are running when the bad one arrives
    if bad is not None:
        engine.add_request("bad", [3, 4, 5], bad)
        for name, value in (after_validation or {}).items():
            setattr(engine.requests["bad"].sampling_params, name, value)
    finished: dict[str, tuple[list[int], Any]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = (list(out.outputs[0].token_ids), out.error)
    return finished


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_step_failures_fail_one_request(async_scheduling: bool, injected_failures: None) -> None:
    engine = Engine(make_config(num_blocks=256, async_scheduling=async_scheduling))
    alone = _run_to_end(engine, None)
    assert len(alone) == 6 and all(err is None for _, err in alone.values())

    def constrained(marker: str) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, regex=f"({marker}|[a-z ]{{1,40}})")

    # (parameters, fields set after validation, what the bad request's error says)
    bad_cases: list[tuple[SamplingParams, dict[str, Any], str]] = [
        (SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=1), {"seed": 2**70}, "internal error"),
        (SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS), {"top_k": 2**63}, "internal error"),
        (SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=[BREAK_DETOKENIZER]), {}, "tokenizer failed"),
        (constrained(BREAK_MATCHER), {}, "matcher broke"),
        (constrained(BREAK_MASK), {}, "mask fill broke"),
    ]
    for params, after_validation, says in bad_cases:
        result = _run_to_end(engine, params, after_validation)
        _, error = result.pop("bad")
        assert isinstance(error, str) and says in error, error
        assert result == alone
        assert SECRET not in repr(result)
    engine.pool.check_all_free()


def test_engine_validate_refuses_what_the_vocabulary_cannot_hold() -> None:
    engine = Engine(make_config(num_blocks=64))
    vocab = engine.arch.vocab_size
    engine.validate([1, 2], SamplingParams(top_k=vocab))
    with pytest.raises(InvalidRequestError, match=r"^top_k "):
        engine.validate([1, 2], SamplingParams(top_k=vocab + 1))
    with pytest.raises(InvalidRequestError, match=r"^stop_token_ids "):
        engine.validate([1, 2], SamplingParams(stop_token_ids=[vocab], min_tokens=2))


@pytest.mark.parametrize("fields, name", [
    ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"top_k": 2**63}, "top_k"),
    ({"top_k": -2}, "top_k"), ({"n": 0}, "n"), ({"n": 10**6}, "n"), ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": -1}, "min_tokens"), ({"logprobs": -2}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_p": math.nan}, "top_p"), ({"min_p": math.nan}, "min_p"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"), ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"frequency_penalty": -math.inf}, "frequency_penalty"), ({"stop": ["ok", "\ud800"]}, "stop"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"), ({"regex": "a\udfff"}, "regex"),
    ({"choice": ["x", "\ud800"]}, "choice"), ({"json_schema": {"enum": ["\ud800"]}}, "json_schema"),
    ({"json_schema": {"maximum": math.nan}}, "json_schema"), ({"temperature": "hot"}, "temperature"),
])
def test_sampling_params_name_the_field(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**fields)
    assert info.value.field == name
    assert str(info.value).startswith(name + " ")


def test_sampling_params_accept_the_edges() -> None:
    for seed in (-(2**63), 2**63 - 1, 0):
        assert SamplingParams(seed=seed).seed == seed
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(n=128, logprobs=20, stop=["é", "日本"]).n == 128
    # Tiny temperatures would overflow logits / T in float32; they are clamped as vLLM does.
    assert SamplingParams(temperature=1e-9).temperature == pytest.approx(1e-2)
    assert SamplingParams(temperature=0.0).greedy
