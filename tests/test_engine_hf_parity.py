"""Greedy tokens and top-5 logprobs against Hugging Face transformers on the same tiny weights,
for each architecture, under tiny prefill chunks, with and without prefix caching, and with a page
pool so small that preemption happens."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 32
PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, a small robot named",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": ",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time there lived a king who had three daughters, and the youngest of them was so "
    "beautiful that the sun itself, which has seen so much, was astonished whenever it shone",
]


@functools.lru_cache(maxsize=None)
def hf_reference(arch: str) -> tuple[Path, list[list[int]], list[list[int]], list[list[dict[int, float]]]]:
    """(model dir, prompt ids, greedy output ids, per-position top-5 logprobs) from transformers."""
    path = tiny_model_cached(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm_tok = __import__("transformers").AutoTokenizer.from_pretrained(path)
    prompt_ids, outputs, logprobs = [], [], []
    for text in PROMPTS:
        ids = llm_tok.encode(text)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        out = gen.sequences[0, len(ids):].tolist()
        tops = []
        for step_logits in gen.logits:
            lp = step_logits[0].float().log_softmax(-1)
            values, idx = lp.topk(5)
            tops.append(dict(zip(idx.tolist(), values.tolist())))
        prompt_ids.append(ids)
        outputs.append(out)
        logprobs.append(tops)
    return path, prompt_ids, outputs, logprobs


_last_llm: list[LLM] = []


def llm_engine_of_last_run():  # type: ignore[no-untyped-def]
    return _last_llm[-1].engine


def run_engine(arch: str, **engine_kwargs: object) -> tuple[list[list[int]], list]:
    path, prompt_ids, _, _ = hf_reference(arch)
    llm = LLM(str(path), device="cpu", dtype="float32", **engine_kwargs)
    _last_llm[:] = [llm]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5)
    outs = llm.generate(prompt_ids, params)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def check_logprobs_close(ref_ids: list[int], ref_lps: list[dict[int, float]], ids: list[int],
                         lps: list[dict], name: str) -> None:
    """vLLM's rule: where the two greedy sequences first differ, each one's token must be in the
    other's top-n; after that the sequences are not compared. Where they agree, the logprobs of the
    shared top tokens must be close."""
    for pos, (ref_tok, tok) in enumerate(zip(ref_ids, ids)):
        ours = {t: lp.logprob for t, lp in lps[pos].items()}
        if ref_tok != tok:
            assert tok in ref_lps[pos] and ref_tok in ours, f"{name}: position {pos} diverged outside the top-5"
            return
        for t, ref_lp in ref_lps[pos].items():
            if t in ours:
                assert abs(ours[t] - ref_lp) < 1e-3, f"{name}: logprob of token {t} at {pos}: {ours[t]} vs {ref_lp}"
        top5 = {t for t, lp in lps[pos].items() if lp.rank <= 5}
        assert len(top5 & set(ref_lps[pos])) >= 4, f"{name}: top-5 sets differ at {pos}"



CONFIGS = {
    "default": dict(),
    "chunk1": dict(max_num_batched_tokens=1),
    "chunk4": dict(max_num_batched_tokens=4),
    "chunk16": dict(max_num_batched_tokens=16, block_size=8),
    "no-prefix-cache": dict(enable_prefix_caching=False, max_num_batched_tokens=16),
    # 32 pages of 4 tokens hold the longest sequence but not all five: preemption must happen.
    # decode_reserve_tokens=0: admission reserves no room for outputs, so decoding runs the pool dry.
    "preemption": dict(num_blocks=32, block_size=4, max_num_batched_tokens=24, decode_reserve_tokens=0),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_matches_transformers(arch: str, config: str) -> None:
    _, _, ref_outputs, ref_logprobs = hf_reference(arch)
    ids, lps = run_engine(arch, **CONFIGS[config])
    for i, (ref, got) in enumerate(zip(ref_outputs, ids)):
        assert got == ref, f"{arch}/{config} prompt {i}: tokens differ\nHF:   {ref}\nours: {got}"
        check_logprobs_close(ref, ref_logprobs[i], got, lps[i], f"{arch}/{config}/{i}")
    assert len(ref_outputs[0]) >= 16  # long enough to mean something (EOS may end some early)
    if config == "preemption":
        engine = llm_engine_of_last_run()
        assert engine.metrics.num_preemptions_total > 0, "the small pool should have forced preemption"


def test_prefix_cache_hits_shared_prefix() -> None:
    path, prompt_ids, ref_outputs, _ = hf_reference("qwen2")
    llm = LLM(str(path), device="cpu", dtype="float32", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    long_prompt = prompt_ids[-1]
    first = llm.generate([long_prompt], params)[0]
    second = llm.generate([long_prompt], params)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == ref_outputs[-1]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(long_prompt) - 1) // 4 * 4
    assert llm.engine.metrics.prefix_cache_hit_rate > 0
