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
