"""vLLM's offline forms that its users' code passes to LLM: SamplingParams(structured_outputs=
StructuredOutputsParams(...)) and the older guided_decoding=GuidedDecodingParams(...) give the same
constrained outputs as agentserve's own fields; what they ask for and agentserve cannot do names the field;
generate(priority=[...]) orders the prompts under the priority policy."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, Field

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.sampling_params import GuidedDecodingParams, StructuredOutputsParams
from agentserve.testing import tiny_model_cached

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
          "required": ["city", "days"], "additionalProperties": False}


class Trip(BaseModel):
    city: str = Field(max_length=8)  # bounded, so that the random tiny model's answer ends within max_tokens
    days: int = Field(ge=1, le=30)


@pytest.fixture(scope="module")
def llm() -> Any:
    with LLM(str(tiny_model_cached("qwen2")), num_blocks=128, max_model_len=256) as engine:
        yield engine


def _text(llm: LLM, params: SamplingParams, prompt: str = "Plan a trip:") -> str:
    return llm.generate(prompt, params)[0].outputs[0].text


@pytest.mark.parametrize("keyword,cls", [("structured_outputs", StructuredOutputsParams),
                                         ("guided_decoding", GuidedDecodingParams)])
def test_vllm_constraint_objects_constrain_like_agentserves_fields(llm: LLM, keyword: str, cls: type) -> None:
    def params(**constraint: Any) -> SamplingParams:
        return SamplingParams(max_tokens=64, temperature=0.8, seed=3, **{keyword: cls(**constraint)})

    # Each form gives exactly the tokens of agentserve's own field with the same seed.
    for constraint, own in (({"json": SCHEMA}, {"json_schema": SCHEMA}), ({"json": json.dumps(SCHEMA)},
                                                                          {"json_schema": json.dumps(SCHEMA)}),
                            ({"choice": ["yes", "no", "maybe"]}, {"choice": ["yes", "no", "maybe"]}),
                            ({"regex": "[a-c]{3}-[0-9]{2}"}, {"regex": "[a-c]{3}-[0-9]{2}"}),
                            ({"json_object": True}, {"json_object": True})):
        got = _text(llm, params(**constraint))
        assert got == _text(llm, SamplingParams(max_tokens=64, temperature=0.8, seed=3, **own)), constraint
    jsonschema.validate(json.loads(_text(llm, params(json=SCHEMA))), SCHEMA)
    assert _text(llm, params(choice=["yes", "no", "maybe"])) in ("yes", "no", "maybe")
    trip = Trip.model_validate_json(_text(llm, params(json=Trip)))  # a pydantic model class, as vLLM takes it
    assert isinstance(trip.days, int)
    grammar = 'root ::= "go " ("north" | "south")'
    assert _text(llm, params(grammar=grammar)) in ("go north", "go south")


@pytest.mark.parametrize("fields,says", [
    (dict(regex="a+", whitespace_pattern=r"[ ]?"), "structured_outputs.whitespace_pattern is not supported"),
    (dict(json=SCHEMA, disable_any_whitespace=True), "disable_any_whitespace"),
    (dict(json=SCHEMA, regex="a+"), "exactly one of json, regex, choice, grammar, json_object and structural_tag (got json, regex)"),
    (dict(), "exactly one of json, regex, choice, grammar, json_object and structural_tag (got none)"),
])
def test_what_the_vllm_objects_ask_for_and_agentserve_cannot_do_names_the_field(fields: dict[str, Any],
                                                                                 says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        SamplingParams(structured_outputs=StructuredOutputsParams(**fields))


def test_one_constraint_in_two_places_is_an_error() -> None:
    with pytest.raises(ValueError, match="structured_outputs gives a constraint and so does regex"):
        SamplingParams(regex="a+", structured_outputs=StructuredOutputsParams(choice=["a"]))
    with pytest.raises(ValueError, match="guided_decoding gives a constraint and so does json_schema"):
        SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA),
                       guided_decoding=GuidedDecodingParams(json=SCHEMA))
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": SCHEMA})  # type: ignore[arg-type]
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    assert params.choice == ["a", "b"] and params.structured_outputs is None
    assert params.clone(max_tokens=3).choice == ["a", "b"]  # read once: the clone carries the field, not the object


def test_generate_priority_orders_the_prompts_under_the_priority_policy() -> None:
    prompts = ["one two three", "four five six", "seven eight nine"]
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(str(tiny_model_cached("qwen2")), num_blocks=64, max_model_len=128, max_num_seqs=1,
             scheduling_policy="priority") as llm:
        outs = llm.generate(prompts, greedy, priority=[2, 0, 1])
        order = sorted(range(3), key=lambda i: outs[i].metrics.first_token_time)
        assert order == [1, 2, 0]  # lower runs first, as in vLLM
        with pytest.raises(ValueError, match="priority has 2 values for 3 prompts"):
            llm.generate(prompts, greedy, priority=[0, 1])
    with LLM(str(tiny_model_cached("qwen2")), num_blocks=64, max_model_len=128) as fcfs:
        assert len(fcfs.generate(prompts, greedy, priority=[0, 0, 0])) == 3
        with pytest.raises(ValueError, match="scheduling_policy=.priority."):
            fcfs.generate(prompts, greedy, priority=[1, 0, 0])


def test_a_request_level_backend_must_be_the_engines(llm: LLM) -> None:
    """vLLM V1's rule: the backend is the engine's; a request may name it (vLLM's names too), not another."""
    greedy = dict(max_tokens=8, temperature=0)
    own = _text(llm, SamplingParams(choice=["yes", "no"], **greedy))  # type: ignore[arg-type]
    for name in ("guidance", "llguidance", "auto"):
        named = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"], backend=name), **greedy)
        assert _text(llm, named) == own
    other = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"], backend="xgrammar"), **greedy)
    with pytest.raises(ValueError, match="request-level backend selection is not supported; this server compiles "
                                         "constraints with 'llguidance'"):
        llm.generate("hi", other)


@pytest.mark.parametrize("keyword,cls", [("structured_outputs", StructuredOutputsParams),
                                         ("guided_decoding", GuidedDecodingParams)])
def test_a_constraint_set_on_built_params_constrains(llm: LLM, keyword: str, cls: type) -> None:
    """vLLM code sets the constraint after building the params (and after clone()); it was silently ignored."""
    params = SamplingParams(temperature=0.0, max_tokens=8)
    setattr(params, keyword, cls(choice=["yes", "no"]))
    assert _text(llm, params) in ("yes", "no")
    copy = SamplingParams(temperature=0.0, max_tokens=8).clone()
    setattr(copy, keyword, cls(regex="[0-9]{3}"))
    assert re.fullmatch("[0-9]{3}", _text(llm, copy))
    with pytest.raises(ValueError, match=keyword):  # one constraint in two places, as at construction
        setattr(params, keyword, cls(regex="a"))


def test_vllms_sentinels_and_deep_clone() -> None:
    """seed -1 is no seed (it was a fixed seed: the same samples every call); logprobs / prompt_logprobs -1 are
    the whole vocabulary (refused before; allowed where max_logprobs is -1); clone() is a deep copy."""
    assert SamplingParams(seed=-1).seed is None
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64) as small:  # vLLM's finished() method
        done = small.generate(["hi"], SamplingParams(max_tokens=2))[0]
        assert done.finished and done.outputs[0].finished()
    base = SamplingParams(logit_bias={5: 1.0}, bad_words=["x"])
    copy = base.clone()
    copy.logit_bias[6] = 2.0  # type: ignore[index]
    copy.bad_words.append("y")  # type: ignore[union-attr]
    assert base.logit_bias == {5: 1.0} and base.bad_words == ["x"]
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64, max_logprobs=-1) as whole:
        out = whole.generate(["hello there my friend"], SamplingParams(max_tokens=2, logprobs=-1, prompt_logprobs=-1))[0]
        vocab = whole.engine.arch.vocab_size
        assert len(out.outputs[0].logprobs[0]) == vocab and len(out.prompt_logprobs[1]) == vocab
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64) as capped, \
            pytest.raises(ValueError, match="logprobs must be in"):
        capped.generate(["hi"], SamplingParams(max_tokens=2, logprobs=-1))


@pytest.mark.parametrize("bad", [StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "x"}}}),
                                 StructuredOutputsParams(regex="(unclosed")], ids=["schema", "regex"])
def test_a_constraint_that_does_not_compile_refuses_the_whole_call_before_queueing(llm: LLM, bad: Any) -> None:
    """vLLM's processor validates a structured-output request when it is added, so generate() raises ValueError
    and nothing of the call runs; the prompts beside it are not queued, and the engine serves the next call."""
    good = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="could not be compiled"):
        llm.generate(["first", "second"], [good, SamplingParams(max_tokens=4, structured_outputs=bad)])
    assert not llm.engine.has_unfinished()
    llm.engine.pool.check_all_free()
    assert len(llm.generate("first", good)[0].outputs[0].token_ids) == 4
