"""Thinking models (vLLM's --reasoning-parser qwen3 / deepseek_r1): output constraints apply after the
reasoning block, which is free (a regex, a schema, tool calls all start after `</think>`), or from the first
token when the prompt closed the block (Qwen3 with thinking off); the matcher rolls back across the end
marker for speculation, and greedy constrained outputs with speculation equal those without. Chat replies
carry the reasoning as reasoning_content (whole and streamed), tool calls parsed from the content."""

from __future__ import annotations

import json
import re

import pytest
import transformers

from agentserve import SamplingParams
from agentserve.chat.reasoning import ReasoningStream, split_reasoning
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError, allocate_token_bitmask, bitmask_to_ids
from agentserve.grammar.reasoning import ReasoningMarkers, ReasoningMatcher
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai
from helpers.spec_models import speculative_token_ids

ARCH = "qwen3"
REGEX = "(yes|no)"
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, num_blocks=128, reasoning_parser="qwen3")


def _markers(llm: LLM) -> ReasoningMarkers:
    assert llm.engine.reasoning is not None
    return llm.engine.reasoning


def test_matcher_is_free_until_the_end_marker_and_rolls_back_across_it() -> None:
    llm = LLM(str(tiny_model_cached(ARCH)), **ENGINE)
    tok, markers = llm.tokenizer, _markers(llm)
    vocab = llm.engine.arch.vocab_size
    info = TokenizerInfo.from_hf(tok, vocab_size=vocab, eos_token_ids=sorted(llm.engine.eos_token_ids))
    compiled = GrammarCompiler(get_backend("llguidance"), info).compile(ConstraintSpec.regex(REGEX))
    matcher = ReasoningMatcher(compiled.new_matcher(), markers.end_id, thinking=True)
    mask = allocate_token_bitmask(1, vocab)
    matcher.fill_bitmask(mask)
    free = bitmask_to_ids(mask[0], vocab)
    assert len(free) == vocab - len(llm.engine.eos_token_ids)  # anything but EOS while thinking
    thought = tok.encode("hmm, maybe", add_special_tokens=False)
    assert matcher.accept_tokens(thought + [markers.end_id]) == len(thought) + 1 and not matcher.thinking
    matcher.fill_bitmask(mask)
    allowed = {tok.decode([t]) for t in bitmask_to_ids(mask[0], vocab)}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed)
    yes = tok.encode("yes", add_special_tokens=False)
    copy = matcher.copy()
    assert matcher.accept_tokens(yes) == len(yes) and matcher.is_accepting()
    matcher.rollback(len(yes) + 2)  # back across the end marker: thinking again
    assert matcher.thinking and not matcher.is_accepting()
    assert not copy.is_accepting() and not copy.thinking  # the copy kept its own state
    assert markers.ended_in(tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert not markers.ended_in(tok.encode("</think> <think>", add_special_tokens=False))
    llm.close()


def test_engine_constraint_starts_after_the_reasoning() -> None:
    llm = LLM(str(tiny_model_cached(ARCH)), **ENGINE)
    tok, markers = llm.tokenizer, _markers(llm)
    prompt = tok.encode("Is it so? ", add_special_tokens=False)
    regex = SamplingParams(regex=REGEX, temperature=0.0, max_tokens=24)
    # The prompt closed the block (thinking off): constrained from the first token.
    closed = llm.generate([prompt + [markers.start_id, markers.end_id]], regex)[0].outputs[0]
    assert closed.text in ("yes", "no") and closed.finish_reason == "stop"
    # Inside the block: free text until the model writes </think> (a bias makes it likely), then the regex.
    # (A random-weight model rates </think> low: +21 makes it come after a few tokens of "thought".)
    seeded = regex.clone(temperature=1.0, seed=7, logit_bias={markers.end_id: 21.0})
    outs = [o.outputs[0] for o in llm.generate([prompt] * 6, [seeded.clone(seed=s) for s in range(6)])]
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert finished and any(not c.text.startswith("</think>") for c in finished)  # some thought first
    for c in finished:
        thought, answer = c.text.split("</think>", 1)
        assert answer in ("yes", "no")
    # Without the parser the same request is constrained from its first token.
    llm.close()
    plain = LLM(str(tiny_model_cached(ARCH)), **{**ENGINE, "reasoning_parser": None})
    assert plain.generate([prompt], regex)[0].outputs[0].text in ("yes", "no")
    plain.close()


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_reasoning_constraints_are_exact_under_speculation(proposer: str) -> None:
    prompts = ["Think: a b a b a b a b", "More: c d c d c d"]
    params = SamplingParams(regex="(yes|no)( (yes|no)){0,6}", temperature=0.0, max_tokens=40)
    llm = LLM(str(tiny_model_cached(ARCH)), **ENGINE)
    end = _markers(llm).end_id
    # Bias </think> so that the block closes after a few tokens in some positions (greedy: deterministic).
    params = params.clone(logit_bias={end: 21.0})
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.close()
    assert speculative_token_ids(ARCH, proposer, prompts, params, **ENGINE) == want


@pytest.mark.parametrize("text,in_reasoning,want", [
    ("<think>\nhm\n</think>\n\nyes", True, ("\nhm\n", "\n\nyes")),  # Qwen3 thinking: it opens the block
    ("<think>\nhm\n</think>\n\nyes", False, ("\nhm\n", "\n\nyes")),  # opened though the prompt closed one
    ("\n\nyes", False, (None, "\n\nyes")),                          # thinking off: all content
    ("hm</think>ok", True, ("hm", "ok")),                             # the prompt opened it (DeepSeek-R1)
    ("still thinking", True, ("still thinking", "")),                # cut short while thinking
])
def test_split_reasoning_whole_and_streamed(text: str, in_reasoning: bool, want: tuple) -> None:
    for parser in ("qwen3", "deepseek_r1"):
        assert split_reasoning(parser, text, in_reasoning) == want
        for size in (1, 3, 100):  # the same split from deltas of any size (markers arrive whole)
            pieces = re.split("(<think>|</think>)", text)
            deltas = [p[i:i + size] if p not in ("<think>", "</think>") else p for p in pieces for i in
                      (range(0, len(p), size) if p not in ("<think>", "</think>") else [0]) if p]
            rs = ReasoningStream(parser, in_reasoning)
            parts = [rs.feed(d) for d in deltas] + [rs.finish()]
            assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == (want[0] or "", want[1])


@pytest.mark.parametrize("text,in_reasoning,want", [
    ("hm</think>ok", True, ("hm", "ok")),
    ("<think>a<b</think></think>ok", False, ("a<b", "</think>ok")),  # a '<' that begins no marker; a 2nd marker
    ("hm</thi", True, ("hm</thi", "")),                                 # cut short in what began a marker
])
def test_streamed_split_when_a_marker_arrives_in_pieces(text: str, in_reasoning: bool, want: tuple) -> None:
    """The detokenizer holds back the text's last characters while they may begin a stop string, so a
    marker's text (one token) can arrive in two deltas: the streamed split still equals the whole one."""
    assert split_reasoning("qwen3", text, in_reasoning) == want
    for size in (1, 2, 3, 5):
        rs = ReasoningStream("qwen3", in_reasoning)
        parts = [rs.feed(text[i:i + size]) for i in range(0, len(text), size)] + [rs.finish()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == want, size


def test_streamed_reasoning_content_with_a_long_stop_string() -> None:
    """A stop string longer than `</think>` that never matches: the stream (text held back 11 characters
    at a time) splits the reply as the whole reply is split."""
    with live_openai(ARCH, max_model_len=512, reasoning_parser="qwen3") as client:
        end_id = transformers.AutoTokenizer.from_pretrained(str(tiny_model_cached(ARCH))).encode(
            "</think>", add_special_tokens=False)[0]
        body = dict(model="m", messages=[{"role": "user", "content": "Is it?"}], max_tokens=30, temperature=1.0,
                    logit_bias={str(end_id): 21}, stop=["QQQQQQQQQQQQ"])
        answered = 0
        for seed in range(6):
            whole = client.chat.completions.create(**body, seed=seed).choices[0].message
            chunks = list(client.chat.completions.create(**body, seed=seed, stream=True))
            thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert (thought, content) == (whole.model_extra["reasoning_content"], whole.content or ""), seed
            answered += bool(whole.content)
        assert answered  # some replies closed their thinking (else the split was never tested)


def test_a_parser_the_tokenizer_cannot_spell_is_refused() -> None:
    with pytest.raises(GrammarError, match="not one token"):
        LLM(str(tiny_model_cached("llama3")), device="cpu", dtype="float32", reasoning_parser="qwen3")
    with pytest.raises(GrammarError, match="is not one of"):
        LLM(str(tiny_model_cached(ARCH)), device="cpu", dtype="float32", reasoning_parser="nope")


def test_chat_replies_carry_reasoning_content() -> None:
    with live_openai(ARCH, max_model_len=512, reasoning_parser="qwen3") as client:
        end_id = transformers.AutoTokenizer.from_pretrained(str(tiny_model_cached(ARCH))).encode(
            "</think>", add_special_tokens=False)[0]
        # The reply thinks until </think> (biased to come soon), then answers under the regex.
        body = dict(model="m", messages=[{"role": "user", "content": "Is it?"}], max_tokens=30,
                    logit_bias={str(end_id): 21}, extra_body={"guided_regex": REGEX})
        done = None
        for seed in range(8):
            out = client.chat.completions.create(**body, seed=seed)
            if out.choices[0].finish_reason == "stop":
                done = out
                break
        assert done is not None
        message = done.choices[0].message
        assert message.content in ("yes", "no") and isinstance(message.model_extra.get("reasoning_content"), str)
        chunks = list(client.chat.completions.create(**body, seed=seed, stream=True))
        thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == message.content and thought == message.model_extra["reasoning_content"]
        # Tool calls after the reasoning: the call is parsed from the content, the thought kept apart.
        tools = [{"type": "function", "function": {"name": "read_file", "parameters": {
            "type": "object", "properties": {"path": {"enum": ["notes.txt", "todo.md"]}}, "required": ["path"]}}}]
        called = None
        for seed in range(8):
            out = client.chat.completions.create(**{**body, "extra_body": {}, "max_tokens": 80}, seed=seed, tools=tools,
                                                 tool_choice="required")
            if out.choices[0].finish_reason == "tool_calls":
                called = out.choices[0].message
                break
        assert called is not None and called.tool_calls and called.tool_calls[0].function.name == "read_file"
        assert json.loads(called.tool_calls[0].function.arguments)["path"] in ("notes.txt", "todo.md")
        assert isinstance(called.model_extra.get("reasoning_content"), str) and "</think>" not in (called.content or "")
        streamed = list(client.chat.completions.create(**{**body, "extra_body": {}, "max_tokens": 80}, seed=seed,
                                                       tools=tools, tool_choice="required", stream=True))
        thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed if c.choices)
        args = "".join(tc.function.arguments or "" for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or [])
        assert thought == called.model_extra["reasoning_content"]
        assert json.loads(args) == json.loads(called.tool_calls[0].function.arguments)
