"""vLLM's prompt dicts in the offline API: {"prompt": text} and {"prompt_token_ids": ids} (TextPrompt /
TokensPrompt) give the same outputs as the text and the id list; other keys are refused by name."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_prompt_dicts_match_plain_prompts() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", dtype="float32")
    ids = [5, 6, 7, 8, 9]

    def tokens(outs: list) -> list:  # type: ignore[type-arg]
        return [list(o.outputs[0].token_ids) for o in outs]

    assert tokens(llm.generate({"prompt_token_ids": ids}, PARAMS)) == tokens(llm.generate(ids, PARAMS))
    assert tokens(llm.generate({"prompt": "hello there"}, PARAMS)) == tokens(llm.generate("hello there", PARAMS))
    mixed = llm.generate([{"prompt_token_ids": ids}, "hello there", ids], PARAMS)
    assert tokens(mixed) == tokens(llm.generate([ids, "hello there", ids], PARAMS))
    for bad, match in (({"prompt_token_ids": ids, "multi_modal_data": {}}, "'multi_modal_data' not supported"),
                       ({}, "exactly one"), ({"prompt": 5}, "must be text"),
                       ({"prompt_token_ids": "abc"}, "list of token ids")):
        with pytest.raises(ValueError, match=match):
            llm.generate(bad, PARAMS)
    llm.engine.pool.check_all_free()
    llm.close()


def test_a_prompt_dicts_cache_salt_namespaces_its_prefix_pages() -> None:
    """vLLM's TextPrompt / TokensPrompt take "cache_salt": a salted prompt finds only pages cached under the
    same salt (it was refused as an unknown key, leaving no offline way to salt)."""
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", dtype="float32")
    ids = list(range(5, 45))  # two full 16-token pages and a tail

    def cached(prompt: object) -> int:
        return llm.generate(prompt, PARAMS)[0].num_cached_tokens  # type: ignore[arg-type]

    assert cached({"prompt_token_ids": ids}) == 0
    assert cached({"prompt_token_ids": ids, "cache_salt": "tenant-a"}) == 0, "a salt must not see unsalted pages"
    assert cached({"prompt_token_ids": ids, "cache_salt": "tenant-b"}) == 0, "nor another salt's"
    assert cached({"prompt_token_ids": ids, "cache_salt": "tenant-a"}) == 32
    assert cached(ids) == 32
    for bad in ("", 5):
        with pytest.raises(ValueError, match="'cache_salt' must be a non-empty string"):
            llm.generate({"prompt_token_ids": ids, "cache_salt": bad}, PARAMS)
    llm.engine.pool.check_all_free()
    llm.close()
