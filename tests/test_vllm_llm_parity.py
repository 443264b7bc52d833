"""vLLM's offline `LLM` as scripts use it, on agentserve's LLM."""

from __future__ import annotations

from agentserve import LLM, SamplingParams
from agentserve.testing import tiny_model_cached


def test_get_tokenizer_renders_prompts_that_generate_takes() -> None:
    """The common vLLM script: tokenizer = llm.get_tokenizer(), the chat template applied by hand, then
    generate on the text; the same prompt as llm.chat renders."""
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=32, max_model_len=128) as llm:
        tokenizer = llm.get_tokenizer()
        assert tokenizer is llm.tokenizer
        messages = [{"role": "user", "content": "hi"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = SamplingParams(temperature=0.0, max_tokens=3)
        assert llm.generate(text, params)[0].outputs[0].token_ids == llm.chat(messages, params)[0].outputs[0].token_ids


def test_reset_prefix_cache_makes_the_next_prompt_prefill_in_full() -> None:
    """vLLM's llm.reset_prefix_cache(): the repeated prompt found its pages before, not after; same tokens."""
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64, max_model_len=256) as llm:
        prompt = list(range(10, 74))  # four 16-token pages
        params = SamplingParams(temperature=0.0, max_tokens=4)
        first = llm.generate({"prompt_token_ids": prompt}, params)[0]
        again = llm.generate({"prompt_token_ids": prompt}, params)[0]
        assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 48
        assert llm.reset_prefix_cache() is True
        cold = llm.generate({"prompt_token_ids": prompt}, params)[0]
        assert cold.num_cached_tokens == 0
        assert first.outputs[0].token_ids == again.outputs[0].token_ids == cold.outputs[0].token_ids
