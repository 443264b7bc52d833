"""vLLM's stop semantics in the offline API: the stop id that ends an output is in its token ids but not
its text (unless include_stop_str_in_output), and stop strings count only in the text that tokens past
the first min_tokens add."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

PROMPT = "hello world"
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(tiny_model_cached("llama")), device="cpu", max_model_len=256)


def _text(llm: LLM, **params: object) -> tuple[str, list[int]]:
    out = llm.generate(PROMPT, SamplingParams(**{**GREEDY, **params}))[0].outputs[0]
    return out.text, out.token_ids


def test_stop_token_text_is_left_out_unless_include_stop_str_in_output(llm: LLM) -> None:
    full_text, full_ids = _text(llm)
    stop_id = full_ids[1]
    head_text, _ = _text(llm, max_tokens=1)
    with_stop_text, _ = _text(llm, max_tokens=2)
    assert with_stop_text != head_text  # the stop token has text of its own
    out = llm.generate(PROMPT, SamplingParams(stop_token_ids=[stop_id], **GREEDY))[0].outputs[0]
    assert out.token_ids == full_ids[:2] and out.stop_reason == stop_id and out.finish_reason == "stop"
    assert out.text == head_text
    kept = llm.generate(PROMPT, SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True,
                                               **GREEDY))[0].outputs[0]
    assert kept.token_ids == full_ids[:2] and kept.text == with_stop_text


@pytest.mark.parametrize("min_tokens", [0, 2, 4])
def test_stop_strings_count_only_after_min_tokens(llm: LLM, min_tokens: int) -> None:
    full_text, full_ids = _text(llm)
    second_token_text, _ = _text(llm, max_tokens=2)
    first_token_text, _ = _text(llm, max_tokens=1)
    stop = second_token_text[len(first_token_text):].strip()
    assert stop and stop in full_text
    head = _text(llm, max_tokens=min_tokens)[0] if min_tokens else ""
    pos = full_text.find(stop, max(0, len(head) - len(stop) + 1))  # a match must end past the head
    out = llm.generate(PROMPT, SamplingParams(stop=stop, min_tokens=min_tokens, **GREEDY))[0].outputs[0]
    if pos == -1:
        assert out.finish_reason == "length" and out.text == full_text
    else:
        assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == full_text[:pos]
    assert len(out.token_ids) > min_tokens
    if min_tokens >= 2:  # the stop string lies in the first min_tokens tokens: it does not end the output
        assert out.text != full_text[:full_text.find(stop)]


def test_the_generation_configs_other_eos_ids_are_stop_reasons_by_id() -> None:
    # As vLLM: the tokenizer's EOS ends with stop_reason None; the generation config's other EOS ids (the
    # tiny Llama 3's <|end_of_text|> and <|eom_id|>) are stop tokens, reported by id; neither is in the text.
    llm = LLM(str(tiny_model_cached("llama3")), device="cpu", max_model_len=256)
    tokenizer = llm.get_tokenizer()
    own = tokenizer.eos_token_id
    others = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>")]
    assert own not in others and 0 not in others
    for eos, reason in [(own, None), *[(other, other) for other in others]]:
        out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=[eos]))[0].outputs[0]
        assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason == reason
        assert out.text == ""


def test_the_tokenizers_eos_checked_before_stop_token_ids_and_banned_by_min_tokens_under_ignore_eos() -> None:
    llm = LLM(str(tiny_model_cached("llama3")), device="cpu", max_model_len=256)
    tokenizer = llm.get_tokenizer()
    own, other = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    # vLLM checks the tokenizer's EOS before stop_token_ids: listed there too, it still ends with None.
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=[own],
                                              stop_token_ids=[own]))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([own], "stop", None)
    # min_tokens bans vLLM's all_stop_token_ids, the EOS ids among them even under ignore_eos: none of them
    # in the first 3 tokens though a bias makes them the likeliest; after those, sampled and not stopping.
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, ignore_eos=True,
                                              logit_bias={own: 100.0, other: 100.0}))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert not {own, other} & set(out.token_ids[:3]) and set(out.token_ids[3:]) <= {own, other}
    llm.close()


def test_the_tokenizers_eos_stops_when_the_generation_config_leaves_it_out(tmp_path: Path) -> None:
    # vLLM stops on the tokenizer's EOS (request.eos_token_id) whatever generation_config.json lists.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_cached("llama3"), model)
    gen_config = json.loads((model / "generation_config.json").read_text())
    llm = LLM(str(model), device="cpu", max_model_len=256)
    own = llm.get_tokenizer().eos_token_id
    llm.close()
    gen_config["eos_token_id"] = [t for t in gen_config["eos_token_id"] if t != own]
    assert gen_config["eos_token_id"]
    (model / "generation_config.json").write_text(json.dumps(gen_config))
    llm = LLM(str(model), device="cpu", max_model_len=256)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=[own]))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason, out.text) == ([own], "stop", None, "")
    llm.close()


def test_a_generation_config_directory_gives_its_eos_ids(tmp_path: Path) -> None:
    """vLLM's --generation-config DIR: that directory's eos_token_id list stops the output (reported by id), as its
    sampling defaults apply; a generation_config.json without eos_token_id adds none from config.json."""
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    (defaults / "generation_config.json").write_text(json.dumps({"eos_token_id": [700, 701]}))
    llm = LLM(str(tiny_model_cached("llama3")), device="cpu", max_model_len=256, generation_config=str(defaults))
    own = llm.get_tokenizer().eos_token_id
    assert llm.engine.eos_token_ids == frozenset({700, 701, own})
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=[701]))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([701], "stop", 701)
    llm.close()
    (defaults / "generation_config.json").write_text(json.dumps({"temperature": 0.5}))
    llm = LLM(str(tiny_model_cached("llama3")), device="cpu", max_model_len=256, generation_config=str(defaults))
    assert llm.engine.eos_token_ids == frozenset({own})
    llm.close()
