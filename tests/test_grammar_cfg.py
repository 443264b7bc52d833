"""Context-free grammars (vLLM's `guided_grammar` / `structured_outputs.grammar`, SGLang's `ebnf`): GBNF / EBNF
on the llguidance and xgrammar backends, Lark on llguidance; a non-regular language (balanced parentheses)
whose every output is a valid prefix, finished outputs in the language; exact under speculation (greedy
constrained outputs equal those without); a grammar the backend cannot compile, and the outlines backend
(regular languages only), fail that request alone with a message naming the grammar; over HTTP and gRPC."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest

from agentserve import SamplingParams
from agentserve.adapters.client.client import to_response_format
from agentserve.llm import LLM
from agentserve.service import agent_pb2 as pb
from agentserve.service.convert import sampling_from_proto
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai
from helpers.spec_models import noisy_draft

ARCH = "qwen2"
# A language no regular expression describes: n opening parentheses, "x", n closing ones.
BALANCED_GBNF = 'root ::= "(" root ")" | "x"'
YES_NO_LARK = 'start: "yes" | "no" | "maybe"'
LIST_GBNF = 'root ::= "[" item ("," item)* "]"\nitem ::= [0-9] | [0-9] [0-9]'


def make_llm(**kw: Any) -> LLM:
    return LLM(str(tiny_model_cached(ARCH)), device="cpu", dtype="float32", max_num_seqs=16, max_model_len=512, **kw)


def _balanced_prefix(text: str, finished: bool) -> bool:
    m = re.fullmatch(r"(\(*)(x?)(\)*)", text)
    if m is None or len(m.group(3)) > len(m.group(1)) or (m.group(3) and not m.group(2)):
        return False
    return not finished or (m.group(2) == "x" and len(m.group(1)) == len(m.group(3)))


@pytest.mark.parametrize("backend", ["llguidance", "xgrammar"])
def test_gbnf_outputs_are_in_the_language(backend: str) -> None:
    llm = make_llm(grammar_backend=backend)
    prompts = ["Nest something:", "Numbers please:", "Another one", "More"]
    params = [SamplingParams(grammar=BALANCED_GBNF, temperature=1.0, seed=i, max_tokens=24) for i in range(2)]
    params += [SamplingParams(grammar=LIST_GBNF, temperature=1.0, seed=i, max_tokens=48) for i in range(2)]
    outs = llm.generate(prompts, params)
    for out in outs[:2]:
        c = out.outputs[0]
        assert c.finish_reason in ("stop", "length") and _balanced_prefix(c.text, c.finish_reason == "stop"), c.text
    finished = [o.outputs[0] for o in outs[2:] if o.outputs[0].finish_reason == "stop"]
    assert finished, "no list output finished within max_tokens"
    for c in finished:
        assert re.fullmatch(r"\[\d{1,2}(,\d{1,2})*\]", c.text), c.text
    llm.close()


def test_lark_on_llguidance_and_speculation_exactness() -> None:
    params = SamplingParams(grammar=YES_NO_LARK, temperature=0.0, max_tokens=8)
    plain = make_llm()
    want = [o.outputs[0].text for o in plain.generate(["Answer:", "Well?"], params)]
    assert all(t in ("yes", "no", "maybe") for t in want)
    # Lists long enough to speculate on (the prompts give the n-gram proposer something to copy).
    lists = SamplingParams(grammar=LIST_GBNF, temperature=0.0, max_tokens=30)
    list_prompts = ["[1,2,3,1,2,3,1,2,3", "Numbers: [4,5,4,5,4,5]"]
    want_lists = [o.outputs[0].token_ids for o in plain.generate(list_prompts, lists)]
    plain.close()
    for spec in (dict(speculative_method="ngram", prompt_lookup_min=1), dict(draft_model=noisy_draft(ARCH))):
        llm = make_llm(num_speculative_tokens=3, spec_dynamic=False, **spec)
        assert [o.outputs[0].text for o in llm.generate(["Answer:", "Well?"], params)] == want
        assert [o.outputs[0].token_ids for o in llm.generate(list_prompts, lists)] == want_lists
        assert llm.engine.metrics.spec_num_draft_tokens > 0
        llm.close()


def test_bad_grammars_are_refused_before_anything_runs() -> None:
    """Offline, as vLLM's processor: generate() raises for a grammar that does not compile, naming the backend's
    reason, and queues nothing of the call; the engine serves the next call."""
    llm = make_llm()
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="grammar"):
        llm.generate(["a", "b"], [SamplingParams(grammar="root ::= [a-", max_tokens=4), plain])
    assert not llm.engine.has_unfinished() and len(llm.generate(["b"], plain)[0].outputs[0].token_ids) == 4
    llm.close()
    outlines = make_llm(grammar_backend="outlines")
    with pytest.raises(ValueError, match="outlines.*grammar|grammar.*outlines"):
        outlines.generate(["a"], SamplingParams(grammar=BALANCED_GBNF, max_tokens=4))
    outlines.close()
    with pytest.raises(ValueError, match="at most one of"):
        SamplingParams(grammar=BALANCED_GBNF, regex="x")


def test_grammar_over_http_and_grpc() -> None:
    rf = to_response_format({"type": "grammar", "grammar": YES_NO_LARK})
    assert rf is not None and sampling_from_proto(pb.SamplingParams(), rf).grammar == YES_NO_LARK
    with live_openai(ARCH, max_model_len=512) as client:
        for extra in ({"guided_grammar": YES_NO_LARK}, {"structured_outputs": {"grammar": YES_NO_LARK}}):
            out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok?"}], max_tokens=8,
                                                 extra_body=extra)
            assert out.choices[0].message.content in ("yes", "no", "maybe")
        listed = client.completions.create(model="m", prompt="[", max_tokens=40, temperature=0,
                                           extra_body={"structured_outputs": {"grammar": LIST_GBNF}})
        assert re.fullmatch(r"\[(\d{1,2}(,\d{1,2})*\]?)?", listed.choices[0].text)
        with pytest.raises(openai.BadRequestError, match="at most one output constraint"):
            client.completions.create(model="m", prompt="x", extra_body={"guided_grammar": YES_NO_LARK,
                                                                         "guided_regex": "a+"})
        with pytest.raises(openai.BadRequestError, match="grammar"):
            client.completions.create(model="m", prompt="x", extra_body={"guided_grammar": "root ::= [a-"})
