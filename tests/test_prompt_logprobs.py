"""vLLM's prompt_logprobs: the raw log-probability of every prompt token given the tokens before it, with
its rank and the top n alternatives, checked against Hugging Face transformers on the same weights, across
chunked prefill, the prefix cache (cached pages carry no logits), preemption by recompute, n > 1 and
speculation; and over HTTP as OpenAI's completions echo + logprobs (the official client) and vLLM's
`prompt_logprobs` field."""

from __future__ import annotations

import math
import re
from typing import Iterator, Optional

import openai
import pytest
import torch
import transformers

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.outputs import Logprob, RequestOutput
from agentserve.request import Request
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached
from agentserve.worker.prompt_logprobs import plan_prompt_logprob_rows
from agentserve.worker.step_inputs import ScheduledChunk
from helpers.live_server import live_openai

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 30, 31, 32, 40, 41, 42, 43], [11, 12, 13, 14, 15, 11, 12, 13, 14]]
ENGINE = dict(device="cpu", dtype="float32", block_size=4)


def _reference(path: str, prompt: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def _check(entries: Optional[list[Optional[dict[int, Logprob]]]], prompt: list[int], ref: torch.Tensor, n: int) -> None:
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        position = entries[i]
        assert position is not None
        token = position[prompt[i]]
        assert math.isclose(token.logprob, ref[i - 1, prompt[i]].item(), abs_tol=1e-4)
        # Ranks among logprobs within the tolerance of the token's own may come out either way (random
        # weights give near-ties: another transformers release moved one of them across).
        value = ref[i - 1, prompt[i]]
        assert int((ref[i - 1] > value + 1e-4).sum()) + 1 <= token.rank <= int((ref[i - 1] > value - 1e-4).sum()) + 1
        top = {tid: lp for tid, lp in position.items() if lp.rank <= n and (tid != prompt[i] or token.rank <= n)}
        assert sorted(top) == sorted(ref[i - 1].topk(n).indices.tolist())
        assert all(math.isclose(lp.logprob, ref[i - 1, tid].item(), abs_tol=1e-4) for tid, lp in top.items())


def _check_outputs(outs: list[RequestOutput], refs: list[torch.Tensor], want: list[RequestOutput]) -> None:
    """Prompt logprobs against transformers (top 2), generated tokens against the plain engine's."""
    for out, prompt, ref, w in zip(outs, PROMPTS, refs, want):
        _check(out.prompt_logprobs, prompt, ref, 2)
        assert out.outputs[0].token_ids == w.outputs[0].token_ids


@pytest.mark.parametrize("arch,async_scheduling", [("llama3", False), ("qwen3", True)])
def test_prompt_logprobs_match_transformers_across_chunks_and_the_prefix_cache(arch: str, async_scheduling: bool) -> None:
    path = str(tiny_model_cached(arch))
    refs = [_reference(path, p) for p in PROMPTS]
    # A 5-token budget splits each prompt into chunks; the second call finds the prompts' pages cached.
    llm = LLM(path, num_blocks=64, max_num_batched_tokens=5, enable_prefix_caching=True,
              async_scheduling=async_scheduling, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3)
    for _ in range(2):
        outs = llm.generate(PROMPTS, params)
        for out, prompt, ref in zip(outs, PROMPTS, refs):
            _check(out.prompt_logprobs, prompt, ref, 3)
    plain = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=3))
    assert all(o.prompt_logprobs is None for o in plain)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs]
    # Without prompt logprobs the cache is used again (the pages scored above were registered).
    assert all(o.num_cached_tokens > 0 for o in plain)
    llm.close()


def test_prompt_logprobs_survive_preemption_n_and_speculation() -> None:
    path = str(tiny_model_cached("llama3"))
    refs = [_reference(path, p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    want = LLM(path, num_blocks=64, **ENGINE).generate(PROMPTS, params)
    # 14 pages of 4 tokens cannot hold both requests to the end (no room reserved for outputs at
    # admission): one is preempted and recomputed.
    small = LLM(path, num_blocks=14, max_num_batched_tokens=6, decode_reserve_tokens=0, **ENGINE)
    _check_outputs(small.generate(PROMPTS, params), refs, want)
    assert small.engine.metrics.num_preemptions_total > 0
    small.close()
    many = LLM(path, num_blocks=64, **ENGINE).generate(PROMPTS[:1], params.clone(n=3, temperature=1.0, seed=1))
    assert len(many[0].outputs) == 3
    _check(many[0].prompt_logprobs, PROMPTS[0], refs[0], 2)
    spec = LLM(path, num_blocks=64, num_speculative_tokens=3, draft_model=path, spec_dynamic=False, **ENGINE)
    _check_outputs(spec.generate(PROMPTS, params), refs, want)
    assert spec.engine.metrics.spec_num_draft_tokens > 0
    spec.close()


def test_prompt_logprobs_are_validated() -> None:
    for bad in (-2, 1.5, True):  # -1 is vLLM's whole vocabulary; the upper bound is the engine's --max-logprobs
        with pytest.raises(SamplingParamsError, match="prompt_logprobs must be an integer in"):
            SamplingParams(prompt_logprobs=bad)


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with live_openai("qwen2", served_model_name="tiny", max_model_len=512) as c:
        yield c


def test_completions_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    path = str(tiny_model_cached("qwen2"))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "The quick brown fox jumps over the lazy dog"
    ids = tok(text)["input_ids"]
    ref = _reference(path, ids)
    # lm-eval-harness's loglikelihood request shape, and vLLM's echo-only max_tokens=0.
    for max_tokens in (1, 0):
        out = client.completions.create(model="tiny", prompt=text, max_tokens=max_tokens, temperature=0, echo=True,
                                        logprobs=2)
        lp = out.choices[0].logprobs
        assert lp is not None
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(ids) + max_tokens
        assert "".join(lp.tokens[:len(ids)]) == tok.decode(ids)
        for i in range(1, len(ids)):
            assert math.isclose(lp.token_logprobs[i], ref[i - 1, ids[i]].item(), abs_tol=1e-3)
            assert 2 <= len(lp.top_logprobs[i]) <= 3
        assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
        assert out.usage.completion_tokens == max_tokens
        assert out.choices[0].text.startswith(text)
        if max_tokens == 0:
            assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(ids) + 3
    assert math.isclose(streamed[1], ref[0, ids[1]].item(), abs_tol=1e-3)


def test_vllm_prompt_logprobs_field_over_http(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 1})
    field = out.choices[0].model_extra["prompt_logprobs"]
    assert field[0] is None and len(field) == 4
    assert "7" in field[2] and {"logprob", "rank", "decoded_token"} <= set(field[2]["7"])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    scored = chat.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
                                       extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs must be in"):
        client.completions.create(model="tiny", prompt="hi", extra_body={"prompt_logprobs": 50})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)


def test_prompt_logprobs_under_tensor_parallelism() -> None:
    """Two ranks over gloo: the sampled rows' and the prompt rows' logits come back together (in ascending
    flat order), the prompt logprobs are transformers', the tokens the one-rank engine's."""
    path = str(tiny_model_cached("llama3"))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    want = LLM(path, num_blocks=64, **ENGINE).generate(PROMPTS, params)
    with LLM(path, num_blocks=64, max_num_batched_tokens=7, tensor_parallel_size=2, **ENGINE) as llm:
        outs = llm.generate(PROMPTS, params)
    for out, prompt, w in zip(outs, PROMPTS, want):
        _check(out.prompt_logprobs, prompt, _reference(path, prompt), 2)
        assert out.outputs[0].token_ids == w.outputs[0].token_ids


def test_the_plan_scores_each_prompt_token_once() -> None:
    """Rows past the prompt's second-to-last position and rows below the cursor (a recompute after
    preemption) score nothing; only the first of n sequences scores."""
    params = SamplingParams(prompt_logprobs=1)
    req = Request("r", list(range(10, 20)), params)
    plan = plan_prompt_logprob_rows([ScheduledChunk(req, 4, 0), ScheduledChunk(Request("s", [1, 2], SamplingParams()), 1, 1)])
    assert plan is not None and plan.flat_indices == [0, 1, 2, 3] and plan.target_ids == [11, 12, 13, 14]
    assert plan.first_token == [1] and req.num_prompt_logprobs_planned == 5
    req.num_computed_tokens = 4
    plan = plan_prompt_logprob_rows([ScheduledChunk(req, 6, 1)])  # the last chunk: position 9 samples
    assert plan is not None and plan.flat_indices == [0, 1, 2, 3, 4] and plan.target_ids == [15, 16, 17, 18, 19]
    req.num_computed_tokens = 0  # preempted: the recompute scores nothing again
    assert plan_prompt_logprob_rows([ScheduledChunk(req, 10, 1)]) is None
    assert Request("r2", [1, 2, 3], params, index=1).prompt_logprobs is None


def test_return_tokens_as_token_ids(client: openai.OpenAI) -> None:
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}" (the request's field, or the
    server's flag when the request leaves it unset)."""
    prompt = [5, 6, 7, 8]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True})
    tokens = out.choices[0].logprobs.tokens
    assert tokens[:4] == [f"token_id:{t}" for t in prompt] and len(tokens) == 7
    assert all(re.fullmatch(r"token_id:\d+", t) for top in out.choices[0].logprobs.top_logprobs[1:] for t in top)
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(re.fullmatch(r"token_id:\d+", e.token) for e in content)
    assert all(re.fullmatch(r"token_id:\d+", t.token) for e in content for t in e.top_logprobs)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, logprobs=True)
    assert not any(e.token.startswith("token_id:") for e in plain.choices[0].logprobs.content)
    # The same greedy tokens: the names are the ids of the texts the plain request returned.
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_cached("qwen2")))
    assert [tok.decode([int(e.token.split(":")[1])]) for e in content] == [e.token for e in plain.choices[0].logprobs.content]
    # Renamed, a token keeps its own bytes (they were the bytes of "token_id:N"), in top_logprobs too.
    named = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                           top_logprobs=2).choices[0].logprobs.content
    assert [e.bytes for e in content] == [e.bytes for e in named]
    assert [[t.bytes for t in e.top_logprobs] for e in content] == [[t.bytes for t in e.top_logprobs] for e in named]
    with live_openai("qwen2", served_model_name="tiny", max_model_len=256, return_tokens_as_token_ids=True) as flagged:
        on = flagged.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True)
        assert all(e.token.startswith("token_id:") for e in on.choices[0].logprobs.content)
        off = flagged.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True,
                                              extra_body={"return_tokens_as_token_ids": False})
        assert not any(e.token.startswith("token_id:") for e in off.choices[0].logprobs.content)
